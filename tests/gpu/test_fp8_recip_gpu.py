"""kernels/fp8_quant.py's RECIP_DIV (division by the row's reciprocal with a remainder correction) compiled on a GPU:
every FP8 producer launch gives the software-rounding reference's bits (the correctly rounded division, no hardware
conversion). bench/fp8_div.py checks the identity for every 16-bit pair. Run:
.venv/bin/python -m pytest -q tests/gpu/test_fp8_recip_gpu.py"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels import fp8_fused, fp8_quant  # noqa: E402

DEVICE = torch.device("cuda")


def same(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


@pytest.fixture
def recip(monkeypatch):
    monkeypatch.setattr(fp8_quant, "RECIP_DIV", True)


@pytest.mark.parametrize("m", [256, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_recip_quant_rows(recip, m, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    x = torch.randn(m, 4096, generator=g, device=DEVICE).to(dtype)
    x[:, :4] = -0.0
    assert same(fp8_quant.quantize_fp8_rows(x), fp8_quant.quantize_fp8_rows(x, hw_cvt=False))


@pytest.mark.parametrize("m,scaled", [(256, True), (8192, False)])
def test_gpu_recip_norm(recip, m, scaled):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    x = (torch.randn(m, 4096, generator=g, device=DEVICE) * (40 if scaled else 0.4)).to(torch.bfloat16)
    res = torch.randn(m, 4096, generator=g, device=DEVICE).to(torch.bfloat16)
    w = (torch.rand(4096, generator=g, device=DEVICE) + 0.5).to(torch.bfloat16)
    sc = (torch.rand(m, 1, generator=g, device=DEVICE) * 0.01, torch.rand(4096, generator=g, device=DEVICE) * 0.01) \
        if scaled else None
    r1, r2 = res.clone(), res.clone()
    assert same(fp8_fused.add_rms_norm_fp8(x, r1, w, 1e-5, x_scales=sc),
                fp8_fused.add_rms_norm_fp8(x, r2, w, 1e-5, x_scales=sc, hw_cvt=False))


@pytest.mark.parametrize("m,scaled", [(256, True), (8192, False)])
def test_gpu_recip_swiglu(recip, m, scaled):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    gu = (torch.randn(m, 2 * 14336, generator=g, device=DEVICE) * (40 if scaled else 0.4)).to(torch.bfloat16)
    gu[:, :3] = -0.0
    sc = (torch.rand(m, 1, generator=g, device=DEVICE) * 0.01, torch.rand(1, 2 * 14336, generator=g, device=DEVICE)
          * 0.01) if scaled else None
    assert same(fp8_fused.silu_mul_fp8(gu, scales=sc), fp8_fused.silu_mul_fp8(gu, scales=sc, hw_cvt=False))
