"""Fused RMSNorm (+ residual), rotary embedding and SwiGLU kernels against their torch references."""

import pytest
import torch

from kernels.fused_norm import add_rms_norm, add_rms_norm_ref
from kernels.rotary import rotary_inplace, rotary_ref
from kernels.silu_mul import silu_mul, silu_mul_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [96, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=g).to(DEV, dtype)
    res = torch.randn(7, hidden, generator=g).to(DEV, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEV, dtype)
    res_ref = res.clone() if res is not None else None
    ref = add_rms_norm_ref(x.clone(), res_ref, w, 1e-5)
    out = add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    if with_residual:
        torch.testing.assert_close(res, res_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_rotary_inplace(dtype, hq, hkv, d):
    g = torch.Generator().manual_seed(hq * d)
    t = 5
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)
    ang = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = ang.cos().to(DEV), ang.sin().to(DEV)
    ref = qkv.clone()
    rotary_ref(ref, cos, sin, hq, hkv, d)
    rotary_inplace(qkv, cos, sin, hq, hkv, d)
    torch.testing.assert_close(qkv, ref, atol=TOL[dtype], rtol=TOL[dtype])
    v = slice((hq + hkv) * d, None)
    assert torch.equal(qkv[:, v], ref[:, v])  # v is left untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [100, 1536])
def test_silu_mul(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(6, 2 * inter, generator=g).to(DEV, dtype)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), atol=TOL[dtype], rtol=TOL[dtype])


def test_rotary_matches_the_models_torch_path():
    """The kernel's convention is the model's (HF rotate_half), not just its own reference's."""
    from services.engine.model.llama import apply_rope

    hq, hkv, d, t = 4, 2, 32, 3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV)
    ang = torch.rand(t, d // 2, generator=g).to(DEV)
    emb = torch.cat((ang, ang), dim=-1)
    q = apply_rope(qkv[:, :hq * d].view(t, hq, d), emb.cos()[:, None], emb.sin()[:, None])
    rotary_inplace(qkv, ang.cos(), ang.sin(), hq, hkv, d)
    torch.testing.assert_close(qkv[:, :hq * d].view(t, hq, d), q, atol=1e-6, rtol=1e-6)
