"""The Triton attention path (reshape_and_cache + decode / prefill kernels) honours every AttentionParams
field and non-power-of-two head sizes, against the float64 reference of tests/kernels/attention_reference.py.

With a sliding window, block-table entries wholly before the window point at a NaN block (as if freed
and reused): a kernel that reads one fails.
"""

import pytest
import torch

from attention_reference import alibi_slopes, make_variant_batch, reference_attention
from kernels.paged_decode import paged_decode
from kernels.paged_prefill import paged_prefill
from paged_cases import TOLERANCE, kernel_device
from services.engine.attention.params import AttentionParams
from services.engine.attention.triton_backend import TritonAttentionBackend

DEVICE = kernel_device()
MIXED = [(37, 37), (45, 13), (21, 1), (64, 32), (1, 1), (70, 1)]  # prompts, extends, decodes
DECODES = [(21, 1), (1, 1), (77, 1), (40, 1)]


def make_params(num_heads: int, scale: float = 0.3, alibi: bool = False, sinks: bool = False, **kw) -> AttentionParams:
    g = torch.Generator().manual_seed(7)
    return AttentionParams(scale=scale, alibi_slopes=alibi_slopes(num_heads).to(DEVICE) if alibi else None,
                           sinks=(torch.randn(num_heads, generator=g) * 2).to(DEVICE) if sinks else None, **kw)


VARIANTS = {
    "window": dict(sliding_window=11),  # shorter than the prompts: whole blocks slide out
    "softcap": dict(logit_softcap=2.0),
    "alibi": dict(alibi=True),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=20, logit_softcap=5.0, alibi=True, sinks=True),
}


def _check(batch, params, dtype):
    out = TritonAttentionBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, params)
    n = sum(batch.meta.query_lens_cpu)
    assert out.shape == batch.q.shape and not out[:n].isnan().any()
    torch.testing.assert_close(out[:n].double().cpu(), reference_attention(batch, params), **TOLERANCE[dtype])
    assert (out[n:] == 0).all(), "padding rows are zeroed"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("steps", [MIXED, DECODES], ids=["mixed", "decode"])
def test_triton_variants_match_float64_reference(variant, head_dim, steps):
    params = make_params(6, **VARIANTS[variant])
    batch = make_variant_batch(steps, 6, 2, head_dim, 16, torch.float32, DEVICE,
                               sliding_window=params.sliding_window, num_padding_tokens=2)
    _check(batch, params, torch.float32)


@pytest.mark.parametrize("head_dim", [96, 112, 256])
def test_triton_odd_head_sizes_fp16(head_dim):
    params = make_params(4, scale=head_dim ** -0.5)
    batch = make_variant_batch([(40, 25), (19, 1), (33, 33)], 4, 2, head_dim, 16, torch.float16, DEVICE)
    _check(batch, params, torch.float16)


@pytest.mark.parametrize("steps", [MIXED, DECODES], ids=["mixed", "decode"])
def test_triton_all_variants_fp16_head_dim_112(steps):
    params = make_params(8, scale=0.125, **VARIANTS["all"])
    batch = make_variant_batch(steps, 8, 1, 112, 8, torch.float16, DEVICE, sliding_window=20)
    _check(batch, params, torch.float16)


@pytest.mark.parametrize("variant", ["window", "all"])
def test_decode_splits_with_window_and_sinks(variant):
    # Split-KV over the window only; the sink joins split 0 alone. Two sequences, forced 4 splits.
    params = make_params(4, **VARIANTS[variant])
    batch = make_variant_batch([(300, 1), (150, 1)], 4, 2, 64, 16, torch.float32, DEVICE,
                               sliding_window=params.sliding_window, new_in_cache=True)
    m = batch.meta
    for splits in (1, 4):
        out = paged_decode(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, params.scale, num_splits=splits,
                           sliding_window=params.sliding_window, logit_softcap=params.logit_softcap,
                           alibi_slopes=params.alibi_slopes, sinks=params.sinks)
        torch.testing.assert_close(out.double().cpu(), reference_attention(batch, params), **TOLERANCE[torch.float32])


def test_prefill_window_tile_larger_than_blocks():
    # 64-key tiles over 8-token blocks: the first tile of a row's window starts in freed blocks.
    params = make_params(4, sliding_window=9)
    batch = make_variant_batch([(90, 40), (70, 1), (50, 50)], 4, 2, 32, 8, torch.float32, DEVICE,
                               sliding_window=9, new_in_cache=True)
    m = batch.meta
    out = paged_prefill(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, params.scale,
                        config=dict(BLOCK_M=16, BLOCK_N=64), sliding_window=9)
    torch.testing.assert_close(out.double().cpu(), reference_attention(batch, params), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("kwargs,match", [
    (dict(sliding_window=0), "sliding_window must be >= 1"),
    (dict(logit_softcap=-1.0), "logit_softcap must be > 0"),
    (dict(sinks=torch.zeros(3)), r"sinks must be \[num_heads=4\]"),
    (dict(alibi_slopes=torch.zeros(4, 1)), r"alibi_slopes must be \[num_heads=4\]"),
])
def test_kernel_variant_arguments_are_checked(kwargs, match):
    batch = make_variant_batch([(5, 1)], 4, 2, 32, 16, torch.float32, DEVICE, new_in_cache=True)
    m = batch.meta
    with pytest.raises(ValueError, match=match):
        paged_decode(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, 0.3, **kwargs)
    with pytest.raises(ValueError, match=match):
        paged_prefill(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, 0.3, **kwargs)


@pytest.mark.parametrize("variant", ["softcap", "alibi", "all"])
def test_prefill_scale_folded_into_q_leaves_softcap_and_alibi_alone(variant):
    # Q_SCALED folds the softmax scale into q; soft-cap and ALiBi need the raw scores, so there it must
    # not fold (a second scaling would be wrong); the loop attributes ride along (ignored by the interpreter),
    # and OVERLAP_QK's hand-pipelined loop applies the modifiers to each tile's scores too.
    from kernels.paged_prefill_configs import forced_config

    params = make_params(4, **VARIANTS[variant])
    batch = make_variant_batch(MIXED, 4, 2, 32, 16, torch.float32, DEVICE, sliding_window=params.sliding_window,
                               num_padding_tokens=1)
    with forced_config(dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, NEW_KV="tma", PACK_GQA=True,
                            BLOCKWISE=False, REVERSE=True, PAIR_TILES=False, LAZY_RESCALE=False, SEQ_VEC=8,
                            Q_SCALED=True, LOOP_UNROLL=2, OVERLAP_QK=True)):
        _check(batch, params, torch.float32)


@pytest.mark.parametrize("one_loop", [1, 2])
def test_prefill_one_loop_with_window_softcap_alibi_sinks(one_loop):
    # ONE_LOOP folds the diagonal into the free tiles' loop (masked always / by a runtime branch), behind the
    # window's leading-edge loop; a persistent grid walks the work items. Against the float64 reference.
    from kernels.paged_prefill_configs import BASE, forced_config

    params = make_params(4, **VARIANTS["all"])
    batch = make_variant_batch(MIXED, 4, 2, 32, 16, torch.float32, DEVICE, sliding_window=params.sliding_window,
                               num_padding_tokens=1)
    with forced_config(dict(BASE, BLOCK_M=16, BLOCK_N=8, num_warps=4, num_stages=1, maxnreg=None, SEQ_VEC=8,
                            ONE_LOOP=one_loop, PERSISTENT=one_loop - 1)):
        _check(batch, params, torch.float32)
