"""The FP8 kernels that spare the activation-quantization launch, under the interpreter: add + RMSNorm + FP8
and SwiGLU + FP8 (bit for bit the unfused kernels followed by kernels/fp8_quant.py, and close to the torch
references), and the FP8 x FP8 tensor-core GEMM against float64."""

import pytest
import torch

from kernels import splitk
from kernels.fp8_quant import quantize_fp8_rows
from kernels.fp8_w8a8 import fp8_w8a8
from kernels.fused_norm import add_rms_norm, add_rms_norm_fp8, add_rms_norm_ref
from kernels.silu_mul import silu_mul, silu_mul_fp8, silu_mul_ref
from services.engine.model.quantization.fp8 import quantize_activation

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def same_bits(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def assert_close_fp8(got, ref_q, ref_s):
    """Dequantized values within 1.5 e4m3 ulps of the torch reference's, scales within 2e-2 relative: the
    16-bit values they come from may differ in the last bit or two (the interpreter's bfloat16 casts
    truncate; a GPU's exp is not torch's)."""
    torch.testing.assert_close(got[1], ref_s.float(), rtol=2e-2, atol=0)
    deq, ref = got[0].float() * got[1], ref_q.float() * ref_s
    assert bool(((deq - ref).abs() <= ref.abs() * 0.1875 + ref_s * 2 ** -8).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual, ub", [(True, None), (False, None), (True, 0.5)])
def test_add_rms_norm_fp8(dtype, with_residual, ub):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 200, generator=g) * torch.logspace(-3, 2, 5)[:, None]).to(DEV, dtype)  # odd hidden
    res = torch.randn(5, 200, generator=g).to(DEV, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(200, generator=g)).to(DEV, dtype)
    r1, r2, r3 = (res.clone() if res is not None else None for _ in range(3))
    got = add_rms_norm_fp8(x, r1, w, 1e-5, ub=ub)
    unfused = quantize_fp8_rows(add_rms_norm(x, r2, w, 1e-5), ub=ub)
    assert got[0].dtype == torch.float8_e4m3fn and got[1].shape == (5, 1)
    assert same_bits(got, unfused)
    ref = add_rms_norm_ref(x.clone(), r3, w, 1e-5)
    assert_close_fp8(got, *quantize_activation(ref, None, ub))
    if with_residual:  # the interpreter's bfloat16 casts truncate: exact against the unfused kernel only
        assert torch.equal(r1, r2)
        torch.testing.assert_close(r1, r3, rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block, ub", [(None, None), (64, None), (None, 0.25), (128, 0.25)])
def test_silu_mul_fp8(dtype, block, ub):
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(4, 2 * 300, generator=g) * torch.tensor([0.01, 1, 4, 30])[:, None]).to(DEV, dtype)
    gate_up[3, :300] = 0  # an all-zero row: the scale's lower bound
    got = silu_mul_fp8(gate_up, ub=ub, block=block)
    assert same_bits(got, quantize_fp8_rows(silu_mul(gate_up), ub=ub))
    assert_close_fp8(got, *quantize_activation(silu_mul_ref(gate_up), None, ub))
    if block is not None:  # the split launches: tiles of 2 or 4 rows over 64- or 128-wide column blocks
        assert same_bits(silu_mul_fp8(gate_up, ub=ub, split=dict(ROWS=block // 32, BLOCK=block)), got)


def test_silu_mul_fp8_takes_its_launch_from_the_table(monkeypatch):
    """FP8_LAUNCH picks by row count: the split launches up to 2 rows, one program per row above; same bits."""
    from kernels import fp8_fused
    from kernels import silu_mul as sm

    calls = []
    real = fp8_fused.silu_mul_fp8
    monkeypatch.setattr(fp8_fused, "silu_mul_fp8", lambda *a, **k: calls.append(k["split"]) or real(*a, **k))
    monkeypatch.setattr(sm, "FP8_LAUNCH", [(2, {"ROWS": 2, "BLOCK": 64}), (1 << 30, {"BLOCK": 128, "num_warps": 4})])
    g = torch.Generator().manual_seed(5)
    for t, splits_so_far in ((2, 1), (5, 1)):
        gate_up = (torch.randn(t, 2 * 200, generator=g) * 3).to(DEV)
        assert same_bits(silu_mul_fp8(gate_up), quantize_fp8_rows(silu_mul(gate_up)))
        assert len(calls) == splits_so_far


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bfloat16 casts truncate
def test_scaled_inputs_equal_the_scaled_tensor(dtype):
    """An FP8 GEMM's output before its row and column scales (FP8Output), fed to the norm and SwiGLU kernels:
    bit for bit the kernels on (raw * row * column) rounded to the dtype."""
    g = torch.Generator().manual_seed(11)
    raw = (torch.randn(6, 200, generator=g) * 30).to(DEV, dtype)
    row, col = (torch.rand(6, 1, generator=g) * 0.01).to(DEV), (torch.rand(1, 200, generator=g) * 0.02).to(DEV)
    dense = (raw.float() * row * col).to(dtype)
    res = torch.randn(6, 200, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(200, generator=g)).to(DEV, dtype)
    r1, r2, r3, r4 = (res.clone() for _ in range(4))
    assert torch.equal(add_rms_norm(raw, r1, w, 1e-5, x_scales=(row, col)), add_rms_norm(dense, r2, w, 1e-5))
    assert torch.equal(r1, r2)
    assert same_bits(add_rms_norm_fp8(raw, r3, w, 1e-5, x_scales=(row, col)),
                     add_rms_norm_fp8(dense, r4, w, 1e-5))
    gu_col = (torch.rand(1, 200, generator=g) * 0.02).to(DEV)
    gu_dense = (raw.float() * row * gu_col).to(dtype)
    assert torch.equal(silu_mul(raw, scales=(row, gu_col)), silu_mul(gu_dense))
    for block in (None, 32):
        assert same_bits(silu_mul_fp8(raw, block=block, scales=(row, gu_col)), silu_mul_fp8(gu_dense, block=block))
    split = dict(ROWS=4, BLOCK=64)  # the split launches: a ragged last row tile and column block
    assert same_bits(silu_mul_fp8(raw, scales=(row, gu_col), split=split), silu_mul_fp8(gu_dense))
    split = dict(ROWS=2, BLOCK=32, ROWS2=4, BLOCK2=128)  # the quantizing launch over other tiles than the first
    assert same_bits(silu_mul_fp8(raw, scales=(row, gu_col), split=split), silu_mul_fp8(gu_dense))


@pytest.mark.parametrize("m, k, n, split, atomic", [
    (5, 200, 37, 1, True),     # odd everything, one slice
    (37, 300, 50, 3, True),    # two M tiles, one-launch atomic split-K over a ragged last slice
    (20, 256, 48, 2, False),   # partial-sum split-K
])
def test_fp8_w8a8_matches_float64(m, k, n, split, atomic):
    g = torch.Generator().manual_seed(m + k + n)
    a = (torch.randn(m, k, generator=g) * 40).to(torch.float8_e4m3fn)
    a_s = torch.rand(m, 1, generator=g) + 0.01
    w = (torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn)
    w_s = torch.rand(n, generator=g) + 0.1
    ref = (a.double() * a_s.double()) @ (w.double() * w_s.double()[:, None]).t()
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, ATOMIC=atomic, num_warps=4, num_stages=1)
    out = fp8_w8a8(a.to(DEV), a_s.to(DEV), w.to(DEV), w_s.to(DEV), torch.float32, config=cfg)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    ws, cnt = splitk.workspace(torch.device(DEV), 1)
    assert bool((ws == 0).all()) and bool((cnt == 0).all())
    # the default config and bfloat16 output
    out = fp8_w8a8(a.to(DEV), a_s.to(DEV), w.to(DEV), w_s.to(DEV))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_fp8_w8a8_refuses_bad_operands():
    a = torch.zeros(4, 32, dtype=torch.float8_e4m3fn, device=DEV)
    w = torch.zeros(16, 32, dtype=torch.float8_e4m3fn, device=DEV)
    with pytest.raises(ValueError, match="a must be float8_e4m3fn"):
        fp8_w8a8(a.float(), torch.ones(4, 1, device=DEV), w, torch.ones(16, device=DEV))
    with pytest.raises(ValueError, match="a_scale"):
        fp8_w8a8(a, torch.ones(3, 1, device=DEV), w, torch.ones(16, device=DEV))
    with pytest.raises(ValueError, match="weight \\[N, K\\]"):
        fp8_w8a8(a, torch.ones(4, 1, device=DEV), w[:, :16], torch.ones(16, device=DEV))
