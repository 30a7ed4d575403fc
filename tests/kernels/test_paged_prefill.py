"""Paged prefill / extend attention (mixed prefill-chunk and decode batches) against its torch reference."""

import pytest
import torch

from kernels.paged_prefill import paged_prefill, paged_prefill_ref
from paged_cases import assert_close, kernel_device, make_batch, poisoned_like

DEVICE = kernel_device()

# (seq_len, query_len): a whole prompt, a chunk after a cached prefix (prefix-cache hit or chunked
# prefill), decodes, and a chunk ending exactly on a block boundary.
MIXED = [(37, 37), (45, 13), (21, 1), (64, 32), (1, 1), (70, 1)]


def _run(batch, dtype, config=None):
    n = int(batch.query_start_loc[-1])
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3,
                        out=poisoned_like(batch.q), config=config)
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, 0.3)
    assert_close(out[:n], expected, dtype)
    assert out[n:].isnan().all(), "padding rows must be left alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_prefill_mixed_batch(dtype, group, block_size):
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 2 * group, 2, 64, block_size, dtype, DEVICE,
                       num_padding_tokens=2)
    _run(batch, dtype)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_paged_prefill_head_dims(head_dim):
    batch = make_batch([40, 9], [25, 1], 4, 2, head_dim, 16, torch.float16, DEVICE)
    _run(batch, torch.float16)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16)])
def test_paged_prefill_tile_shapes(block_m, block_n):
    # Tiles smaller and larger than a block, and more query rows per tile than a chunk has.
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 8, 2, 64, 32, torch.float32, DEVICE)
    _run(batch, torch.float32, config=dict(BLOCK_M=block_m, BLOCK_N=block_n))


def test_paged_prefill_decode_only_batch_equals_decode_kernel():
    from kernels.paged_decode import paged_decode

    batch = make_batch([5, 33, 17], [1, 1, 1], 8, 2, 64, 16, torch.float32, DEVICE)
    a = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3)
    b = paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
