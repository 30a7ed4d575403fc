"""The triton attention backend equals the torch reference backend on one engine step."""

import pytest
import torch

from paged_cases import kernel_device, make_batch
from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.params import AttentionParams
from services.engine.attention.torch_backend import TorchAttentionBackend
from services.engine.attention.triton_backend import TritonAttentionBackend

DEVICE = kernel_device()


def _metadata(batch, num_tokens):
    return AttentionMetadata(
        num_seqs=len(batch.seq_lens_cpu), num_tokens=num_tokens, query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables, slot_mapping=batch.slot_mapping,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
        query_lens_cpu=batch.query_lens_cpu, seq_lens_cpu=batch.seq_lens_cpu,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps", [
    [(30, 30), (45, 13), (21, 1), (1, 1)],  # prefill, extend and decodes mixed: the prefill kernel
    [(21, 1), (1, 1), (77, 1)],  # decode only: the decode kernel
])
def test_triton_backend_equals_torch_backend(dtype, steps):
    seq_lens, query_lens = map(list, zip(*steps))
    batch = make_batch(seq_lens, query_lens, 9, 3, 64, 16, dtype, DEVICE)
    # Start from a cache whose new slots hold garbage: the backend must write them itself.
    cache_triton = batch.kv_cache.clone()
    flat = cache_triton.view(2, -1, 3, 64)
    flat[:, batch.slot_mapping] = float("nan")
    cache_torch = cache_triton.clone()
    meta = _metadata(batch, batch.q.shape[0])

    got = TritonAttentionBackend().forward(batch.q, batch.k, batch.v, cache_triton, meta, AttentionParams(scale=0.125))
    want = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, cache_torch, meta, AttentionParams(scale=0.125))
    assert torch.equal(cache_triton, cache_torch)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_triton_backend_copy_blocks():
    caches = [torch.randn(2, 6, 16, 3, 64, device=DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    src, dst = torch.tensor([1, 4], device=DEVICE), torch.tensor([5, 0], device=DEVICE)
    TorchAttentionBackend().copy_blocks(expected, src, dst)
    TritonAttentionBackend().copy_blocks(caches, src, dst)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))
