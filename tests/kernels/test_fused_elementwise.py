"""Fused RMSNorm (+ residual), rotary embedding and SwiGLU kernels against their torch references."""

import pytest
import torch

from kernels.fused_norm import add_rms_norm, add_rms_norm_ref
from kernels.reshape_and_cache import reshape_and_cache_ref
from kernels.rotary import rotary_and_cache, rotary_inplace, rotary_qk_inplace, rotary_ref
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


def test_rotary_qk_in_one_launch_where_q_and_k_lie_side_by_side():
    """The model's fused path: q and k split from one qkv turn in one launch, as the two-launch path turns them
    (v untouched); q and k from different buffers are refused (False, nothing written)."""
    hq, hkv, d, t = 6, 2, 32, 4
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, torch.float16)
    ang = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = ang.cos().to(DEV), ang.sin().to(DEV)
    ref = qkv.clone()
    rotary_ref(ref, cos, sin, hq, hkv, d)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    assert rotary_qk_inplace(q, k, cos, sin, d)
    torch.testing.assert_close(qkv, ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])
    assert torch.equal(qkv[:, (hq + hkv) * d:], ref[:, (hq + hkv) * d:])
    apart = qkv.clone()
    assert not rotary_qk_inplace(q.clone(), k.clone(), cos, sin, d)  # not side by side
    assert not rotary_qk_inplace(apart[:, hq * d:(hq + hkv) * d], apart[:, :hq * d], cos, sin, d)  # k before q
    assert torch.equal(apart, qkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, d, block_size", [(6, 2, 32, 4), (4, 4, 16, 8), (3, 1, 64, 16)])
def test_rotary_and_cache_equals_rotary_then_reshape_and_cache(dtype, hq, hkv, d, block_size):
    """One launch per layer: q and k turned in place (as the rotary kernel turns them, v untouched) and the
    turned k and v in the cache exactly where reshape_and_cache puts them, padding slots (-1) left alone;
    layouts other than one fused qkv's side-by-side rows are refused (False, nothing written)."""
    t, blocks = 7, 6
    g = torch.Generator().manual_seed(hq * d + block_size)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)
    ang = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = ang.cos().to(DEV), ang.sin().to(DEV)
    cache = torch.randn(2, blocks, block_size, hkv, d, generator=g).to(DEV, dtype)
    slots = torch.tensor([3, 0, -1, block_size + 1, 6 * block_size - 1, -1, 2 * block_size], device=DEV)
    ref, ref_cache = qkv.clone(), cache.clone()
    rotary_ref(ref, cos, sin, hq, hkv, d)
    reshape_and_cache_ref(ref[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d), ref[:, (hq + hkv) * d:].reshape(t, hkv, d),
                          ref_cache, slots)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    before = cache.clone()
    assert rotary_and_cache(q, k, v, cos, sin, cache, slots, d)
    torch.testing.assert_close(qkv, ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, (hq + hkv) * d:], ref[:, (hq + hkv) * d:])  # v untouched
    torch.testing.assert_close(cache, ref_cache, atol=TOL[dtype], rtol=TOL[dtype])
    real = slots >= 0  # the cache holds exactly the k the kernel left in qkv, and v as it was
    assert torch.equal(cache[0].view(-1, hkv, d)[slots[real]], qkv[real, hq * d:(hq + hkv) * d].view(-1, hkv, d))
    assert torch.equal(cache[1].view(-1, hkv, d)[slots[real]], qkv[real, (hq + hkv) * d:].view(-1, hkv, d))
    written = torch.zeros(blocks * block_size, dtype=torch.bool, device=DEV)
    written[slots[real]] = True
    assert torch.equal(cache.view(2, -1, hkv, d)[:, ~written], before.view(2, -1, hkv, d)[:, ~written])
    # Refused: q, k, v not one qkv's rows in order, or a cache in another dtype (fp8: reshape_and_cache quantizes).
    again = qkv.clone()
    assert not rotary_and_cache(q.clone(), k, v, cos, sin, cache, slots, d)
    assert not rotary_and_cache(q, k, v, cos, sin, cache.to(torch.float64), slots, d)
    assert not rotary_and_cache(q, v, k, cos, sin, cache, slots, d)
    assert torch.equal(again, qkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_and_cache_with_fp8_scales_equals_scaling_first(dtype):
    """An FP8 GEMM's unscaled q/k/v (FP8Output.raw) with its row and column scales: the same qkv rows (v stored
    back scaled) and cache, bit for bit, as FP8Output.dense() followed by the unscaled kernel; bad scales refused."""
    from services.engine.model.quantization.fp8 import FP8Output

    t, hq, hkv, d, block_size, blocks = 5, 4, 2, 16, 4, 3
    g = torch.Generator().manual_seed(11)
    raw = (torch.randn(t, (hq + 2 * hkv) * d, generator=g) * 300).to(DEV, dtype)
    row, col = torch.rand(t, 1, generator=g).to(DEV) * 0.01, torch.rand(1, raw.shape[1], generator=g).to(DEV) * 0.01
    ang = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = ang.cos().to(DEV), ang.sin().to(DEV)
    slots = torch.tensor([3, -1, 0, 2 * block_size + 1, 5], device=DEV)
    cache = torch.zeros(2, blocks, block_size, hkv, d, device=DEV, dtype=dtype)
    want, want_cache = FP8Output(raw, row, col).dense(), cache.clone()
    assert rotary_and_cache(*want.split([hq * d, hkv * d, hkv * d], dim=-1), cos, sin, want_cache, slots, d)
    assert rotary_and_cache(*raw.split([hq * d, hkv * d, hkv * d], dim=-1), cos, sin, cache, slots, d,
                            scales=(row, col))
    assert torch.equal(raw, want) and torch.equal(cache, want_cache)
    with pytest.raises(ValueError, match="row and column scales"):
        rotary_and_cache(*raw.split([hq * d, hkv * d, hkv * d], dim=-1), cos, sin, cache, slots, d,
                         scales=(row, col[:, :-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [100, 1536])
def test_silu_mul(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(6, 2 * inter, generator=g).to(DEV, dtype)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), atol=TOL[dtype], rtol=TOL[dtype])


def test_rotary_matches_the_models_torch_path():
    """The kernel's convention is the model's (HF rotate_half), not just its own reference's."""
    from services.engine.model.config import ModelConfig
    from services.engine.model.layers.rotary import RotaryEmbedding

    hq, hkv, d, t = 4, 2, 32, 3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV)
    ang = torch.rand(t, d // 2, generator=g).to(DEV)
    cfg = ModelConfig.from_hf(dict(hidden_size=hq * d, num_attention_heads=hq, vocab_size=8, num_hidden_layers=1))
    rope = RotaryEmbedding(cfg, d, {"rope_theta": 10000.0, "rope_type": "default"})
    q = rope._rotate(qkv[:, :hq * d], ang.cos(), ang.sin()).view(t, hq, d)
    rotary_inplace(qkv, ang.cos(), ang.sin(), hq, hkv, d)
    torch.testing.assert_close(qkv[:, :hq * d].view(t, hq, d), q, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,rotary_dim", [(80, 80), (80, 32), (64, 16), (40, 24), (96, 96)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_partial_interleaved_and_odd_sizes(dtype, d, rotary_dim, interleaved):
    g = torch.Generator().manual_seed(d + rotary_dim)
    hq, hkv, t = 6, 2, 5
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)
    ang = (torch.rand(t, rotary_dim // 2, generator=g) * 6).to(DEV)
    ref = qkv.clone()
    rotary_ref(ref, ang.cos(), ang.sin(), hq, hkv, d, rotary_dim, interleaved)
    before = qkv.clone()
    rotary_inplace(qkv, ang.cos(), ang.sin(), hq, hkv, d, rotary_dim, interleaved)
    torch.testing.assert_close(qkv, ref, atol=TOL[dtype], rtol=TOL[dtype])
    heads = qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d)
    assert torch.equal(heads[..., rotary_dim:], before[:, :(hq + hkv) * d].view(t, hq + hkv, d)[..., rotary_dim:])
    assert torch.equal(qkv[:, (hq + hkv) * d:], before[:, (hq + hkv) * d:])  # v untouched


def _hf_positions(t, rotary_dim, g):
    pos = torch.arange(t)[None] * 3 + 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    return pos, (pos[0].float()[:, None] * inv_freq[None, :])  # [1, t], [t, rotary_dim // 2]


def test_rotary_equals_transformers_gptj_interleaved_partial():
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    g = torch.Generator().manual_seed(1)
    t, h, d, rotary_dim = 7, 4, 48, 16
    q = torch.randn(1, t, h, d, generator=g)  # GPT-J's layout [batch, seq, heads, head_dim]
    _, ang = _hf_positions(t, rotary_dim, g)
    sincos = torch.cat((ang.sin(), ang.cos()), -1)[None]  # [1, t, rotary_dim]: sin then cos, as GPT-J builds it
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    want = q.clone()
    want[..., :rotary_dim] = gptj.apply_rotary_pos_emb(q[..., :rotary_dim], sin, cos)
    qkv = q[0].reshape(t, h * d).contiguous().to(DEV)
    rotary_inplace(qkv, ang.cos().to(DEV), ang.sin().to(DEV), h, 0, d, rotary_dim, interleaved=True)
    torch.testing.assert_close(qkv.cpu().view(t, h, d), want[0], atol=1e-5, rtol=1e-5)


def test_rotary_equals_transformers_neox_partial():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    g = torch.Generator().manual_seed(2)
    t, h, d, rotary_dim = 6, 3, 80, 32  # Phi-2-like: 40% of an 80-wide head turns
    q = torch.randn(1, h, t, d, generator=g)  # [batch, heads, seq, head_dim]
    _, ang = _hf_positions(t, rotary_dim, g)
    emb = torch.cat((ang, ang), -1)[None]  # [1, t, rotary_dim]
    rot, _ = llama.apply_rotary_pos_emb(q[..., :rotary_dim], q[..., :rotary_dim], emb.cos(), emb.sin())
    want = torch.cat((rot, q[..., rotary_dim:]), -1)
    qkv = q[0].transpose(0, 1).reshape(t, h * d).contiguous().to(DEV)
    rotary_inplace(qkv, ang.cos().to(DEV), ang.sin().to(DEV), h, 0, d, rotary_dim)
    torch.testing.assert_close(qkv.cpu().view(t, h, d), want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def _hf_norm(module, weight, bias=None):
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["gemma", "olmo2", "layernorm", "layernorm_no_bias"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_norm_variants_equal_transformers(dtype, kind, with_residual):
    """Gemma's (1 + w) RMSNorm, OLMo 2's float32 scaling and LayerNorm, each against transformers' own module."""
    from kernels.fused_norm import add_layer_norm, add_rms_norm

    g = torch.Generator().manual_seed(len(kind))
    hidden = 200  # not a power of two: the masked lanes must not enter the statistics
    x = torch.randn(5, hidden, generator=g).to(dtype)
    res = torch.randn(5, hidden, generator=g).to(dtype) if with_residual else None
    w = (0.1 * torch.randn(hidden, generator=g)).to(dtype) + (0 if kind == "gemma" else 1)
    b = (0.1 * torch.randn(hidden, generator=g)).to(dtype)
    summed = x + res if with_residual else x
    if kind == "gemma":
        hf = pytest.importorskip("transformers.models.gemma.modeling_gemma")
        module = _hf_norm(hf.GemmaRMSNorm(hidden, eps=1e-6).to(dtype), w)
        run = lambda xx, rr: add_rms_norm(xx, rr, w.to(DEV), 1e-6, weight_offset=1.0, scale_in_float32=True)  # noqa: E731
    elif kind == "olmo2":
        hf = pytest.importorskip("transformers.models.olmo2.modeling_olmo2")
        module = _hf_norm(hf.Olmo2RMSNorm(hidden, eps=1e-6).to(dtype), w)
        run = lambda xx, rr: add_rms_norm(xx, rr, w.to(DEV), 1e-6, scale_in_float32=True)  # noqa: E731
    else:
        bias = kind == "layernorm"
        module = _hf_norm(torch.nn.LayerNorm(hidden, eps=1e-5, bias=bias).to(dtype), w, b if bias else None)
        run = lambda xx, rr: add_layer_norm(xx, rr, w.to(DEV), b.to(DEV) if bias else None, 1e-5)  # noqa: E731
    with torch.no_grad():
        want = module(summed) if dtype == torch.float32 or kind != "layernorm" else module.float()(summed.float()).to(dtype)
    res_dev = res.to(DEV) if res is not None else None
    out = run(x.to(DEV), res_dev)
    torch.testing.assert_close(out.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])
    if with_residual:
        assert torch.equal(res_dev.cpu(), summed)
