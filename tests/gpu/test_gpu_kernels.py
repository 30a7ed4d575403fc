"""The paged kernels at real sizes on a GPU, in bf16 and fp16, against their torch references."""

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels.copy_blocks import copy_blocks, copy_blocks_ref  # noqa: E402
from kernels.paged_decode import paged_decode, paged_decode_ref  # noqa: E402
from kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402
from kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref  # noqa: E402
from paged_cases import assert_close, make_batch, poisoned_like  # noqa: E402

DEVICE = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16]


def _lens(n, lo, hi, seed):
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 128), (4, 128), (8, 128), (4, 64), (3, 64), (2, 256)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, None, 8, 16])  # 8-16: the split rule's counts at 4-66 sequences
def test_gpu_paged_decode(dtype, group, head_dim, block_size, num_splits):
    num_kv_heads = 8 // min(group, 4)
    seq_lens = _lens(24, 1, 3000, seed=group + head_dim + block_size) + [1, 4096]
    batch = make_batch(seq_lens, [1] * len(seq_lens), group * num_kv_heads, num_kv_heads, head_dim, block_size,
                       dtype, DEVICE, spare_blocks=50)
    out = paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, head_dim**-0.5,
                       max_seq_len=batch.max_seq_len, num_splits=num_splits, out=poisoned_like(batch.q))
    ref = paged_decode_ref(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, head_dim**-0.5)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 128), (4, 128), (8, 128), (3, 64), (2, 256)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_paged_prefill_mixed(dtype, group, head_dim, block_size):
    # A long prompt, chunks after cached prefixes, and decodes in one launch.
    steps = [(1500, 1500), (900, 257), (2100, 64), (333, 1), (1, 1), (4000, 1), (129, 129)]
    seq_lens, query_lens = map(list, zip(*steps))
    num_kv_heads = 8 // min(group, 4)
    batch = make_batch(seq_lens, query_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype,
                       DEVICE, num_padding_tokens=5)
    n = int(batch.query_start_loc[-1])
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                        head_dim**-0.5, out=poisoned_like(batch.q))
    ref = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                            batch.query_start_loc, head_dim**-0.5)
    assert_close(out[:n], ref, dtype)
    assert out[n:].isnan().all()


def test_gpu_large_block_ids_do_not_overflow_int32():
    # Block ids past 2**31 / (block_size * heads * head_dim) = 131072: offsets need 64-bit math.
    offset = 140_000
    batch = make_batch([700, 33], [1, 1], 32, 8, 128, 16, torch.bfloat16, DEVICE, block_id_offset=offset)
    assert batch.kv_cache[0].numel() > 2**31
    ref = paged_decode_ref(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.1)
    for splits in (1, 4):
        out = paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.1, num_splits=splits,
                           out=poisoned_like(batch.q))
        assert_close(out, ref, torch.bfloat16)
    pre = make_batch([700, 33], [200, 33], 32, 8, 128, 16, torch.bfloat16, DEVICE, block_id_offset=offset)
    out = paged_prefill(pre.q, pre.kv_cache, pre.block_tables, pre.seq_lens, pre.query_start_loc, 0.1)
    ref = paged_prefill_ref(pre.q, pre.kv_cache, pre.block_tables, pre.seq_lens, pre.query_start_loc, 0.1)
    assert_close(out, ref, torch.bfloat16)
    k, v = pre.k.clone(), pre.v.clone()
    expected = pre.kv_cache.clone()
    reshape_and_cache_ref(k * 2, v * 2, expected, pre.slot_mapping)
    reshape_and_cache(k * 2, v * 2, pre.kv_cache, pre.slot_mapping)
    assert torch.equal(pre.kv_cache, expected)
    del batch, pre, expected
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_reshape_and_cache_and_copy_blocks(dtype):
    batch = make_batch(_lens(64, 1, 2000, seed=3), _lens(64, 1, 1, seed=0), 32, 8, 128, 16, dtype, DEVICE,
                       num_padding_tokens=7)
    expected = batch.kv_cache.clone()
    k, v = torch.randn_like(batch.k), torch.randn_like(batch.v)
    reshape_and_cache_ref(k, v, expected, batch.slot_mapping)
    reshape_and_cache(k, v, batch.kv_cache, batch.slot_mapping)
    assert torch.equal(batch.kv_cache, expected)
    caches = [batch.kv_cache, expected]
    refs = [c.clone() for c in caches]
    src = torch.arange(0, 40, 2, device=DEVICE)
    dst = torch.arange(41, 81, 2, device=DEVICE)
    copy_blocks(caches, src, dst)
    copy_blocks_ref(refs, src, dst)
    assert all(torch.equal(a, b) for a, b in zip(caches, refs))
