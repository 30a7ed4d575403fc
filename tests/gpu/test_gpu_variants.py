"""The Triton backend's attention variants and odd head sizes at real sizes on a GPU (bf16, fp16), against
the torch backend (itself checked against float64 on CPU) run in float32 on the same data."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from attention_reference import alibi_slopes, make_variant_batch  # noqa: E402
from services.engine.attention.params import AttentionParams  # noqa: E402
from services.engine.attention.torch_backend import paged_attention_ref  # noqa: E402
from services.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda")
MIXED = [(1500, 1500), (900, 257), (2100, 64), (333, 1), (1, 1), (4000, 1), (129, 129)]
DECODES = [(n, 1) for n in (1, 17, 300, 1023, 2500, 4096, 777, 64)]
VARIANTS = {
    "plain": dict(),
    "window": dict(sliding_window=256),
    "window_4096": dict(sliding_window=4096),  # longer than most contexts
    "softcap": dict(logit_softcap=30.0),
    "alibi": dict(alibi=True),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=300, logit_softcap=20.0, alibi=True, sinks=True),
}


def _params(num_heads, head_dim, alibi=False, sinks=False, **kw):
    g = torch.Generator().manual_seed(3)
    return AttentionParams(scale=head_dim ** -0.5, alibi_slopes=alibi_slopes(num_heads).to(DEVICE) if alibi else None,
                           sinks=(torch.randn(num_heads, generator=g) * 2).to(DEVICE) if sinks else None, **kw)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = [(torch.bfloat16, v) for v in VARIANTS] + [(torch.float16, "plain"), (torch.float16, "all")]


@pytest.mark.parametrize("dtype,variant", CASES)
@pytest.mark.parametrize("steps", [MIXED, DECODES], ids=["mixed", "decode"])
@pytest.mark.parametrize("heads,head_dim", [((32, 8), 128), ((16, 2), 80), ((12, 4), 96), ((8, 8), 112), ((8, 4), 256)])
def test_gpu_triton_variants(dtype, variant, steps, heads, head_dim):
    num_heads, num_kv_heads = heads
    params = _params(num_heads, head_dim, **VARIANTS[variant])
    batch = make_variant_batch(steps, num_heads, num_kv_heads, head_dim, 16, dtype, DEVICE,
                               sliding_window=params.sliding_window, num_padding_tokens=3)
    cache = batch.kv_cache.clone()
    out = TritonAttentionBackend().forward(batch.q, batch.k, batch.v, cache, batch.meta, params)
    n = sum(batch.meta.query_lens_cpu)
    assert not out[:n].isnan().any()
    ref = paged_attention_ref(batch.q.float(), cache.float().nan_to_num(), batch.meta, params)
    err = _rel_err(out[:n], ref[:n])
    assert err < 1e-2, f"relative error {err:.2e}"
    assert (out[n:] == 0).all()
