"""kernels/fp8_fused.py under the interpreter (software e4m3 rounding: the interpreter's own fp8 downcast is
inexact): add + RMSNorm + FP8 and SwiGLU + FP8 bit for bit the unfused kernels followed by kernels/fp8_quant.py,
close to the torch references, with and without an FP8 GEMM's deferred scales; and the hardware-rounding form's
clamp-then-cast on e4m3's exact values (the cast rounds nothing then), with the interpreter's cast standing in
for the GPU's conversion there only (bench/fp8_where.py checks the GPU's bits)."""

import pytest
import torch

from kernels import fp8_fused
from kernels.fp8_quant import quantize_fp8_rows
from kernels.fused_norm import add_rms_norm, add_rms_norm_ref
from kernels.silu_mul import silu_mul, silu_mul_ref
from services.engine.model.quantization.fp8 import quantize_activation


def same_bits(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def close_to_reference(got, ref_q, ref_s):
    """Dequantized within 1.5 e4m3 ulps and scales within 2e-2 of torch's (the 16-bit values they come from
    may differ in the last bit: the interpreter's bfloat16 casts truncate)."""
    torch.testing.assert_close(got[1], ref_s.float(), rtol=2e-2, atol=0)
    deq, ref = got[0].float() * got[1], ref_q.float() * ref_s
    return bool(((deq - ref).abs() <= ref.abs() * 0.1875 + ref_s * 2 ** -8).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual, ub, scaled", [(True, None, False), (False, 0.5, False), (True, None, True)])
def test_add_rms_norm_fp8(dtype, with_residual, ub, scaled):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(5, 200, generator=g) * torch.logspace(-3, 2, 5)[:, None]).to(dtype)  # odd hidden
    res = torch.randn(5, 200, generator=g).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(200, generator=g)).to(dtype)
    xs = (torch.rand(5, 1, generator=g) * 2, torch.rand(1, 200, generator=g) * 2) if scaled else None
    r1, r2, r3 = (res.clone() if res is not None else None for _ in range(3))
    got = fp8_fused.add_rms_norm_fp8(x, r1, w, 1e-5, ub=ub, x_scales=xs)
    assert got[0].dtype == torch.float8_e4m3fn and got[1].shape == (5, 1)
    assert same_bits(got, quantize_fp8_rows(add_rms_norm(x, r2, w, 1e-5, x_scales=xs), ub=ub))
    if not scaled:  # scaled: fused_norm's own test holds its kernel to the scaled tensor
        assert close_to_reference(got, *quantize_activation(add_rms_norm_ref(x.clone(), r3, w, 1e-5), None, ub))
    if with_residual:
        assert torch.equal(r1, r2)


@pytest.mark.parametrize("split", [dict(ROWS=2, BLOCK=64), dict(ROWS=4, BLOCK=128, ROWS2=1, BLOCK2=256, warps2=2),
                                   dict(ROWS=1, ROW=True), dict(ROWS=2, ROW=True, num_warps=2),
                                   dict(ROWS=2, ROW=True, PIECES=True)])
@pytest.mark.parametrize("ub, scaled", [(None, False), (0.25, False), (None, True)])
def test_silu_mul_fp8(split, ub, scaled):
    """The split launches and the one launch of whole rows (ROW: 5 rows, so the last program of two rows has one;
    PIECES: 300 columns as 256 + 32 + 16, the last piece part-masked), each twice."""
    g = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(5, 2 * 300, generator=g) * torch.tensor([0.01, 1, 4, 30, 2])[:, None]).to(torch.bfloat16)
    gate_up[3, :300] = 0  # an all-zero row: the scale's lower bound
    sc = (torch.rand(5, 1, generator=g) * 2, torch.rand(1, 600, generator=g) * 2) if scaled else None
    got = fp8_fused.silu_mul_fp8(gate_up, ub=ub, scales=sc, split=split)
    assert same_bits(got, quantize_fp8_rows(silu_mul(gate_up, scales=sc), ub=ub))
    assert same_bits(fp8_fused.silu_mul_fp8(gate_up, ub=ub, scales=sc, split=split), got)
    if not scaled:  # scaled: silu_mul's own test holds its kernel to the scaled tensor
        assert close_to_reference(got, *quantize_activation(silu_mul_ref(gate_up), None, ub))


def test_hardware_rounding_form_clamps_then_casts():
    """With HW_CVT the kernels store clamp(y / scale) through the cast: on values the software rounding leaves
    unchanged (exact e4m3 values; beyond +-448 clamped) both forms give the same bits, under the interpreter too."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = e4m3[torch.isfinite(e4m3)]
    x = torch.cat([vals, torch.tensor([600.0, -1000.0])]).reshape(2, -1)  # static scale 1: q = x, clamped
    one = torch.ones((), dtype=torch.float32)
    soft, hard = quantize_fp8_rows(x, one, hw_cvt=False), quantize_fp8_rows(x, one, hw_cvt=True)
    assert torch.equal(soft[0].view(torch.uint8), hard[0].view(torch.uint8))
    assert torch.equal(soft[0].float().reshape(-1)[-2:], torch.tensor([448.0, -448.0]))


def test_producers_refuse_bad_operands():
    with pytest.raises(ValueError, match="x_scales"):
        fp8_fused.add_rms_norm_fp8(torch.ones(2, 8), None, torch.ones(8), 1e-5, x_scales=(torch.ones(3), torch.ones(8)))
    with pytest.raises(ValueError, match="weight"):
        fp8_fused.add_rms_norm_fp8(torch.ones(2, 8), None, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="gate_up"):
        fp8_fused.silu_mul_fp8(torch.ones(2, 7))
