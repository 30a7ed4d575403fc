"""The torch reference backend honours every AttentionParams field: against a float64 attention written
from the definitions, and against transformers' own eager attention functions."""

import types

import pytest
import torch

from attention_reference import alibi_slopes, make_variant_batch, reference_attention
from services.engine.attention.params import AttentionParams
from services.engine.attention.torch_backend import TorchAttentionBackend

CPU = torch.device("cpu")
MIXED = [(37, 37), (45, 13), (21, 1), (64, 32), (1, 1), (70, 1)]  # prompts, extends, decodes
DECODES = [(21, 1), (1, 1), (77, 1), (40, 1)]

VARIANTS = {
    "plain": dict(),
    "window": dict(sliding_window=11),  # shorter than most prompts; blocks slide out
    "window_1": dict(sliding_window=1),
    "softcap": dict(logit_softcap=2.0),  # small enough that tanh saturates at scale 0.3
    "alibi": dict(alibi=True),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=20, logit_softcap=5.0, alibi=True, sinks=True),
}


def make_params(num_heads: int, scale: float = 0.3, alibi: bool = False, sinks: bool = False, **kw) -> AttentionParams:
    g = torch.Generator().manual_seed(7)
    return AttentionParams(
        scale=scale,
        alibi_slopes=alibi_slopes(num_heads) if alibi else None,
        sinks=torch.randn(num_heads, generator=g) * 2 if sinks else None,
        **kw,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("steps", [MIXED, DECODES], ids=["mixed", "decode"])
@pytest.mark.parametrize("heads,head_dim", [((6, 2), 64), ((4, 4), 80), ((3, 1), 24)])
def test_torch_backend_matches_float64_reference(variant, steps, heads, head_dim):
    num_heads, num_kv_heads = heads
    params = make_params(num_heads, **VARIANTS[variant])
    batch = make_variant_batch(steps, num_heads, num_kv_heads, head_dim, 16, torch.float32, CPU,
                               sliding_window=params.sliding_window, num_padding_tokens=2)
    out = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, params)
    n = sum(batch.meta.query_lens_cpu)
    assert out.shape == batch.q.shape
    torch.testing.assert_close(out[:n].double(), reference_attention(batch, params), atol=2e-5, rtol=1e-4)


def test_torch_backend_bf16_alibi_long_context():
    # ALiBi biases in the thousands: computing them in bf16 would be off by whole logits.
    params = make_params(4, alibi=True)
    batch = make_variant_batch([(600, 5), (300, 1)], 4, 2, 32, 16, torch.bfloat16, CPU)
    out = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, params)
    torch.testing.assert_close(out.double(), reference_attention(batch, params), atol=2e-2, rtol=2e-2)


def test_torch_backend_variants_move_the_output():
    # Each variant must change the result on this batch, or the comparisons above prove nothing.
    batch = make_variant_batch(MIXED, 6, 2, 64, 16, torch.float32, CPU)
    plain = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache.clone(), batch.meta,
                                            make_params(6))
    for name, kw in VARIANTS.items():
        if name == "plain":
            continue
        out = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache.clone(), batch.meta,
                                              make_params(6, **kw))
        assert (out - plain).abs().max() > 1e-2, name


def test_torch_backend_rejects_per_head_tensors_of_the_wrong_size():
    batch = make_variant_batch([(5, 5)], 4, 2, 32, 16, torch.float32, CPU)
    with pytest.raises(ValueError, match="alibi_slopes must be \\[num_heads=4\\]"):
        TorchAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta,
                                        AttentionParams(scale=1.0, alibi_slopes=torch.zeros(8)))


def _dense_prompt(num_heads, num_kv_heads, head_dim, n, params):
    """One whole prompt through the backend, and the same q/k/v as transformers' [1, H, n, D] tensors."""
    batch = make_variant_batch([(n, n)], num_heads, num_kv_heads, head_dim, 16, torch.float32, CPU,
                               sliding_window=params.sliding_window)
    out = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, params)
    to_hf = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [n, H, D] -> [1, H, n, D]
    return out, to_hf(batch.q), to_hf(batch.k), to_hf(batch.v)


def _additive_mask(n, window=None):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]


def test_torch_backend_equals_transformers_gemma2_softcap_and_window():
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    params = AttentionParams(scale=0.2, sliding_window=9, logit_softcap=3.0)
    out, q, k, v = _dense_prompt(4, 2, 48, 40, params)
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=48)
    want, _ = gemma2.eager_attention_forward(module, q, k, v, _additive_mask(40, 9), scaling=0.2, softcap=3.0)
    torch.testing.assert_close(out, want[0], atol=2e-5, rtol=1e-4)


def test_torch_backend_equals_transformers_gpt_oss_sinks():
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    params = make_params(4, scale=0.25, sinks=True, sliding_window=13)
    out, q, k, v = _dense_prompt(4, 1, 32, 30, params)
    module = types.SimpleNamespace(num_key_value_groups=4, training=False, sinks=params.sinks)
    want, _ = gpt_oss.eager_attention_forward(module, q, k, v, _additive_mask(30, 13), scaling=0.25)
    torch.testing.assert_close(out, want[0], atol=2e-5, rtol=1e-4)


def test_torch_backend_equals_transformers_bloom_alibi():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    n, num_heads, head_dim = 25, 6, 32
    # BLOOM adds slope * key_pos (the same softmax as slope * (key_pos - query_pos)).
    alibi = bloom.build_alibi_tensor(torch.ones(1, n), num_heads, torch.float32)  # [H, 1, n]
    slopes = alibi[:, 0, 1]
    params = AttentionParams(scale=head_dim ** -0.5, alibi_slopes=slopes)
    out, q, k, v = _dense_prompt(num_heads, num_heads, head_dim, n, params)
    s = q[0] @ k[0].transpose(-1, -2) * params.scale + alibi + _additive_mask(n)[0]
    want = (s.softmax(-1) @ v[0]).transpose(0, 1)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
