"""The FP8 linear kernels under the interpreter: activation quantization bit for bit against the torch
reference (services/engine/model/quantization/fp8.py), and the weight-only FP8 kernel against float64."""

import pytest
import torch

from kernels import splitk
from kernels.fp8_gemv import fp8_w8a16
from kernels.fp8_quant import quantize_fp8_rows
from services.engine.model.quantization.fp8 import quantize_activation

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["dynamic", "bounded", "static"])
@pytest.mark.parametrize("block_k", [None, 64])  # one pass over a row held in registers, or the two-pass loop
def test_quantize_fp8_rows_equals_torch_bit_for_bit(dtype, mode, block_k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g) * torch.logspace(-4, 2, 5)[:, None]
    x[0, :4] = torch.tensor([124.6, -0.0, 1e-9, -447.9])  # a tie that carries into the exponent, signed zero
    x[1] = 0.0  # an all-zero row: the scale's lower bound
    x = x.to(DEV, dtype)
    static = torch.tensor([0.37], device=DEV) if mode == "static" else None
    ub = 1.5 if mode == "bounded" else None
    q, s = quantize_fp8_rows(x, static, ub, block_k=block_k)
    rq, rs = quantize_activation(x, static, ub)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s, rs.float().expand(5, 1))


def test_quantize_fp8_rows_scales_are_the_correctly_rounded_division_for_every_bf16_mantissa():
    """The case that failed on the H200: each row's amax takes one of bf16's 128 mantissas (at four
    exponents), and the scale must be amax / 448 rounded once to float32 (float64 reference), the values
    x / scale rounded once to float32 and then to e4m3. amax * float32(1 / 448), what torch's CUDA division by
    a Python number computes, differs in the last bit for 71 of the 128 mantissas."""
    mant = torch.arange(0x3F80, 0x4000, dtype=torch.int16).view(torch.bfloat16).float()  # [1, 2)
    amax = torch.cat([mant * 2.0 ** e for e in (-7, 0, 3, 9)])  # 512 rows
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(amax.numel(), 70, generator=g) * 2 - 1) * amax[:, None]
    x[:, 5] = amax  # the row's amax, exactly
    x = x.to(DEV, torch.bfloat16)
    q, s = quantize_fp8_rows(x)
    x64 = x.double().cpu()
    s64 = (x64.abs().amax(1, keepdim=True) / 448.0).float()
    assert torch.equal(s.cpu(), s64)
    assert int((amax[:, None] * torch.tensor(1 / 448, dtype=torch.float32) != s64).sum()) == 4 * 71
    q64 = (x64 / s64.double()).float().clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.cpu().view(torch.uint8), q64.view(torch.uint8))
    rq, rs = quantize_activation(x, None, None)  # the torch reference the GPU check uses: the same bits
    assert torch.equal(rs, s) and torch.equal(rq.view(torch.uint8), q.view(torch.uint8))


def test_quantize_fp8_rows_refuses_a_static_scale_of_several_elements():
    with pytest.raises(ValueError, match="static_scale"):
        quantize_fp8_rows(torch.zeros(2, 16, device=DEV), torch.ones(2, device=DEV))


@pytest.mark.parametrize("m, k, n, use_dot, split, atomic", [
    (1, 300, 37, False, 3, True),   # decode: odd K and N, one-launch split-K
    (3, 200, 24, False, 2, True),   # BLOCK_M = 1 below: one M tile per row
    (3, 256, 64, False, 1, True),
    (4, 130, 40, True, 2, False),   # tensor cores, partial-sum split-K
    (20, 256, 48, True, 2, True),   # two M tiles share the workspace
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_w8a16_matches_float64(m, k, n, use_dot, split, atomic, dtype):
    g = torch.Generator().manual_seed(m + k + n)
    w = (torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(n, generator=g) + 0.1
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = x.double() @ (w.double() * scale.double()[:, None]).t()
    cfg = dict(BLOCK_M=16 if use_dot else 1 if k == 200 else 4, BLOCK_N=16, BLOCK_K=32, USE_DOT=use_dot, SPLIT_K=split, ATOMIC=atomic,
               num_warps=4, num_stages=1)
    out = fp8_w8a16(x.to(DEV), w.to(DEV), scale.to(DEV), config=cfg)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    ws, cnt = splitk.workspace(torch.device(DEV), 1)
    assert not ws.any() and not cnt.any()


def test_fp8_w8a16_default_config_and_bfloat16():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 1024, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(24, generator=g) + 0.5
    x = torch.randn(1, 1024, generator=g).to(torch.bfloat16)
    ref = x.double() @ (w.double() * scale.double()[:, None]).t()
    out = fp8_w8a16(x.to(DEV), w.to(DEV), scale.to(DEV))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_fp8_w8a16_refuses_bad_operands():
    w = torch.zeros(8, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight must be float8_e4m3fn"):
        fp8_w8a16(torch.zeros(1, 32), w.float(), torch.ones(8))
    with pytest.raises(ValueError, match="scale must be float32 with one entry per output row"):
        fp8_w8a16(torch.zeros(1, 32), w, torch.ones(4))
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        fp8_w8a16(torch.zeros(1, 16), w, torch.ones(8))


def test_fast_accum_reaches_scaled_mm_on_cuda_only(monkeypatch):
    """FAST_ACCUM asks cuBLAS for fast accumulation (a CUDA tensor stands in by its is_cuda flag: no GPU here);
    off, or on the CPU, _scaled_mm gets no accumulation argument."""
    from types import SimpleNamespace

    from services.engine.model.quantization import fp8 as fp8mod

    cuda, cpu = SimpleNamespace(is_cuda=True, shape=(8192, 64)), SimpleNamespace(is_cuda=False, shape=(8192, 64))
    monkeypatch.setattr(fp8mod, "FAST_ACCUM_MIN_M", None)  # the row bound alone: the next test
    monkeypatch.setattr(fp8mod, "FAST_ACCUM", False)
    assert fp8mod._fast_accum(cuda) == {} and fp8mod._fast_accum(cpu) == {}
    monkeypatch.setattr(fp8mod, "FAST_ACCUM", True)
    assert fp8mod._fast_accum(cuda) == {"use_fast_accum": True} and fp8mod._fast_accum(cpu) == {}


def test_fast_accum_from_a_row_count(monkeypatch):
    """FAST_ACCUM_MIN_M turns fast accumulation on from that many rows (prefill-sized GEMMs), on CUDA only, with
    FAST_ACCUM off; None leaves it off everywhere (stand-ins by is_cuda and shape, as above)."""
    from types import SimpleNamespace

    from services.engine.model.quantization import fp8 as fp8mod

    def xq(rows, cuda=True):
        return SimpleNamespace(is_cuda=cuda, shape=(rows, 4096))

    monkeypatch.setattr(fp8mod, "FAST_ACCUM", False)
    monkeypatch.setattr(fp8mod, "FAST_ACCUM_MIN_M", None)
    assert fp8mod._fast_accum(xq(8192)) == {}
    monkeypatch.setattr(fp8mod, "FAST_ACCUM_MIN_M", 4097)
    assert fp8mod._fast_accum(xq(4096)) == {} and fp8mod._fast_accum(xq(8192, cuda=False)) == {}
    assert fp8mod._fast_accum(xq(4097)) == {"use_fast_accum": True}
