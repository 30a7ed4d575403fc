"""KV-cache write and block copy against their torch references."""

import pytest
import torch

from kernels.copy_blocks import copy_blocks, copy_blocks_ref
from kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from paged_cases import kernel_device, make_batch

DEVICE = kernel_device()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 64, 16), (3, 64, 16), (2, 128, 32), (4, 256, 16)])
def test_reshape_and_cache_writes_exactly_the_slots(dtype, num_kv_heads, head_dim, block_size):
    batch = make_batch([19, 1, 40], [19, 1, 7], 2 * num_kv_heads, num_kv_heads, head_dim, block_size, dtype,
                       DEVICE, num_padding_tokens=3)
    num_tokens = batch.slot_mapping.numel()
    # Non-contiguous key/value, as when they are views of a fused qkv projection.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    before = batch.kv_cache.clone()
    expected = batch.kv_cache.clone()
    reshape_and_cache_ref(key, value, expected, batch.slot_mapping)
    reshape_and_cache(key, value, batch.kv_cache, batch.slot_mapping)
    assert torch.equal(batch.kv_cache, expected)
    assert not torch.equal(batch.kv_cache, before)  # the test can fail


def test_reshape_and_cache_rejects_mismatched_shapes():
    batch = make_batch([5], [5], 2, 2, 64, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="kv_cache"):
        reshape_and_cache(batch.k[:, :1], batch.v[:, :1], batch.kv_cache, batch.slot_mapping)
    with pytest.raises(ValueError, match="slot_mapping"):
        reshape_and_cache(batch.k, batch.v, batch.kv_cache, batch.slot_mapping.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copy_blocks_copies_every_layer(dtype):
    g = torch.Generator().manual_seed(1)
    caches = [torch.randn(2, 12, 16, 3, 64, generator=g).to(device=DEVICE, dtype=dtype) for _ in range(3)]
    expected = [c.clone() for c in caches]
    src = torch.tensor([0, 5, 7], device=DEVICE)
    dst = torch.tensor([9, 2, 11], device=DEVICE)
    copy_blocks_ref(expected, src, dst)
    copy_blocks(caches, src, dst)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
    assert torch.equal(caches[1][:, 9], caches[1][:, 0])
