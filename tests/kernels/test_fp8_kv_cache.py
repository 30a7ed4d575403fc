"""FP8 (e4m3) KV cache in the Triton kernels against torch: the write is bit-exact with torch's own float8
conversion, decode and prefill/extend over an fp8 pool equal the torch reference backend, copy_blocks copies
fp8 blocks. Interpreted on CPU (its fp8 loads and upcasts are exact; its fp8 downcast is not, which is why
the write kernel rounds in float32 first), compiled on a GPU."""

import pytest
import torch

from kernels.copy_blocks import copy_blocks
from kernels.paged_decode import paged_decode
from kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from paged_cases import TOLERANCE, fp8_batch, hard_e4m3_values, kernel_device
from services.engine.attention.kv_quant import fp8_zeros, quantize_fp8
from services.engine.attention.params import AttentionParams
from services.engine.attention.torch_backend import TorchAttentionBackend, paged_attention_ref
from services.engine.attention.triton_backend import TritonAttentionBackend

DEVICE = kernel_device()


@pytest.mark.parametrize("dtype,k_scale,v_scale", [
    (torch.float32, 1.0, 1.0), (torch.float32, 0.37, 2.5), (torch.bfloat16, 0.37, 2.5), (torch.float16, 1.0, 1.0)])
def test_reshape_and_cache_fp8_is_bit_exact_with_torch(dtype, k_scale, v_scale):
    heads, head_dim, block_size = 2, 64, 8
    x = hard_e4m3_values().to(dtype)  # bf16 / fp16 inputs hold their own roundings of the hard cases
    x = torch.cat([x, x.new_zeros(-x.numel() % (heads * head_dim))]).view(-1, heads, head_dim)
    k, v = x.to(DEVICE), x.flip(0).to(DEVICE)
    n = k.shape[0]
    num_blocks = -(-(n + 5) // block_size)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(0))[:n].to(DEVICE)
    slots[3] = -1  # padding: nothing written
    got = fp8_zeros((2, num_blocks, block_size, heads, head_dim), DEVICE)
    want = got.clone()
    reshape_and_cache(k, v, got, slots, k_scale, v_scale)
    reshape_and_cache_ref(k, v, want, slots, k_scale, v_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # and the reference is the engine's quantizer: the torch backend stores the same bytes
    flat = want.view(2, -1, heads, head_dim)
    assert torch.equal(flat[0, slots[slots >= 0]].view(torch.uint8),
                       quantize_fp8(k[slots >= 0], k_scale).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps", [
    [(30, 30), (45, 13), (21, 1), (1, 1)],  # prefill, extend and decodes mixed: the prefill kernel
    [(21, 1), (1, 1), (77, 1)],  # decode only: the decode kernel
])
def test_triton_backend_fp8_pool_equals_torch_backend(dtype, steps):
    q, k, v, cache, meta = fp8_batch(DEVICE, steps, dtype, k_scale=0.5, v_scale=2.0)
    cache_torch = cache.clone()
    params = AttentionParams(scale=0.125, k_scale=0.5, v_scale=2.0)
    got = TritonAttentionBackend().forward(q, k, v, cache, meta, params)
    want = TorchAttentionBackend().forward(q, k, v, cache_torch, meta, params)
    assert torch.equal(cache.view(torch.uint8), cache_torch.view(torch.uint8))
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


PREFETCH = dict(TILE_N=16, num_warps=4, num_stages=1, PREFETCH=True)


@pytest.mark.parametrize("config", [None, PREFETCH])
def test_fp8_decode_split_kv_with_variants_equals_torch_reference(config):
    """Split-KV partials are scaled by v_scale once, before the reduce; k_scale folds into the soft-cap too; with
    PREFETCH (the next tile loaded ahead) a split's prefetch past its range and the window's edge read nothing."""
    q, k, v, cache, meta = fp8_batch(DEVICE, [(70, 1), (40, 1)], torch.float32, k_scale=0.25, v_scale=3.0)
    params = AttentionParams(scale=0.125, sliding_window=50, logit_softcap=5.0, k_scale=0.25, v_scale=3.0)
    reshape_and_cache(k, v, cache, meta.slot_mapping, 0.25, 3.0)
    got = paged_decode(q, cache, meta.block_tables, meta.seq_lens, 0.125, num_splits=2, sliding_window=50,
                       logit_softcap=5.0, k_scale=0.25, v_scale=3.0, config=config)
    want = paged_attention_ref(q, cache, meta, params)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_copy_blocks_copies_fp8_blocks_bytewise():
    g = torch.Generator().manual_seed(1)
    caches = [quantize_fp8(torch.randn(2, 6, 16, 3, 64, generator=g) * 50, 1.0).to(DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    src, dst = torch.tensor([1, 4], device=DEVICE), torch.tensor([5, 0], device=DEVICE)
    TorchAttentionBackend().copy_blocks(expected, src, dst)
    copy_blocks(caches, src, dst)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches, expected))
    assert torch.equal(caches[0][:, 5].view(torch.uint8), caches[0][:, 1].view(torch.uint8))


def test_fp8_kernels_refuse_bad_scales_and_dtypes():
    q, k, v, cache, meta = fp8_batch(DEVICE, [(5, 1)], torch.float32, 1.0, 1.0)
    with pytest.raises(ValueError, match="k_scale"):
        reshape_and_cache(k, v, cache, meta.slot_mapping, 0.0, 1.0)
    with pytest.raises(ValueError, match="v_scale"):
        paged_decode(q, cache, meta.block_tables, meta.seq_lens, 0.125, v_scale=float("inf"))
    with pytest.raises(ValueError, match="k_scale"):
        AttentionParams(scale=0.125, k_scale=-1.0)
    bf16_cache = torch.zeros(cache.shape, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        reshape_and_cache(k, v, bf16_cache, meta.slot_mapping)  # float32 keys into a bfloat16 cache


def _decode_f64(q, cache, meta, scale, k_scale, v_scale):
    """Float64 attention of each sequence's one query over its dequantized fp8 keys and values."""
    pool = cache.view(torch.uint8)
    block_size, kv_heads, head_dim = cache.shape[2], cache.shape[3], cache.shape[4]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(meta.seq_lens_cpu):
        blocks = meta.block_tables[i, : -(-n // block_size)].long().cpu()
        k, v = (pool[j, blocks].reshape(-1, kv_heads, head_dim)[:n].view(cache.dtype).double() * s
                for j, s in ((0, k_scale), (1, v_scale)))
        group = q.shape[1] // kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        p = (torch.einsum("hd,nhd->hn", q[i].double().cpu(), k) * scale).softmax(-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v)
    return out


@pytest.mark.parametrize("q_scale, config", [(1.0, None), (3e4, None), (1e-30, None), (1.0, PREFETCH)])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_decode_bf16_query_float16_dots_against_float64(q_scale, config, num_splits):
    """A bfloat16 query over an fp8 pool: both dots run in float16 with the query scaled by a power of two
    into float16's range, so queries far beyond float16's range (3e4 * N(0,1) reaches ~1e5) or below its
    subnormals (1e-30), with the softmax scale making their scores O(1), give the float64 attention within bfloat16's tolerance."""
    q, k, v, cache, meta = fp8_batch(DEVICE, [(70, 1), (40, 1), (1, 1), (33, 1)], torch.float32, k_scale=0.5,
                                     v_scale=2.0, num_heads=8, num_kv_heads=2)
    reshape_and_cache(k, v, cache, meta.slot_mapping, 0.5, 2.0)
    q = (q * q_scale).to(torch.bfloat16)
    scale = 0.125 / q_scale  # scores of the same size in every case
    got = paged_decode(q, cache, meta.block_tables, meta.seq_lens, scale, num_splits=num_splits, k_scale=0.5,
                       v_scale=2.0, config=config)
    want = _decode_f64(q, cache, meta, scale, 0.5, 2.0)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)


def test_fp8_pool_takes_its_own_decode_launch(monkeypatch):
    """The GPU's launch over an fp8 pool comes from FP8_KV_CONFIG where it is set; a 16-bit pool's is unchanged."""
    from kernels import paged_decode as pd

    monkeypatch.setattr(pd, "_interpreting", lambda: False)
    monkeypatch.setattr(pd, "FP8_KV_CONFIG", dict(TILE_N=128, num_warps=8, num_stages=3))
    bf16 = pd._decode_config(128, torch.bfloat16)
    assert pd._decode_config(128, torch.bfloat16, kv_fp8=True) == dict(TILE_N=128, num_warps=8, num_stages=3)
    assert bf16 != pd.FP8_KV_CONFIG and pd._decode_config(128, torch.bfloat16, kv_fp8=False) == bf16
    monkeypatch.setattr(pd, "FP8_KV_CONFIG", {})
    assert pd._decode_config(128, torch.bfloat16, kv_fp8=True) == bf16


def test_fp8_decode_rows_of_a_mixed_step_with_prefetch_equal_torch_backend():
    """A mixed step's one-token rows through the decode kernel (query_start_loc) with PREFETCH, over an fp8 pool."""
    q, k, v, cache, meta = fp8_batch(DEVICE, [(30, 30), (45, 1), (21, 1), (1, 1)], torch.float16, k_scale=0.5,
                                     v_scale=2.0)
    params = AttentionParams(scale=0.125, k_scale=0.5, v_scale=2.0)
    want = TorchAttentionBackend().forward(q, k, v, cache.clone(), meta, params)
    reshape_and_cache(k, v, cache, meta.slot_mapping, 0.5, 2.0)
    got = paged_decode(q, cache, meta.block_tables, meta.seq_lens, 0.125, query_start_loc=meta.query_start_loc,
                       config=PREFETCH, k_scale=0.5, v_scale=2.0)
    rows = meta.query_start_loc[1:4].long()  # the three one-token sequences' rows
    torch.testing.assert_close(got[rows].float(), want[rows].float(), **TOLERANCE[torch.float16])
