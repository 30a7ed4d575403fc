"""Builders for paged-attention test batches, shared by tests/kernels and tests/gpu."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Tolerances against a float32 reference, by input dtype (the kernel accumulates in fp32 and feeds
# P to the second tl.dot in the input dtype).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def kernel_device() -> torch.device:
    """Compiled on a GPU, interpreted on the CPU."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


@dataclass
class PagedBatch:
    """One step's batch over a paged cache (field names as in AttentionMetadata)."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]: this step's new keys
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]


def make_batch(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: torch.device, spare_blocks: int = 3,
               num_padding_tokens: int = 0, generator: torch.Generator | None = None,
               block_id_offset: int = 0) -> PagedBatch:
    """A batch whose block tables are a random permutation of the pool.

    The whole pool (spare blocks included) holds random K/V, so a kernel that reads a wrong block
    or slot gets a wrong answer. The new tokens' K/V are both in `k`/`v` and already in the cache
    (as after reshape_and_cache). `block_id_offset` shifts every used block id up (with blocks below
    it left out of the pool's random fill) to test large-index arithmetic.
    """
    g = generator or torch.Generator().manual_seed(0)
    assert all(1 <= ql <= sl for ql, sl in zip(query_lens, seq_lens))
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_used = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_used, generator=g) + block_id_offset
    num_blocks = num_used + block_id_offset
    max_blocks = max(blocks_per_seq) + 1  # a padding column, filled with 0 as the seam says
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb

    kv_cache = torch.empty(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    pool = kv_cache[:, block_id_offset:]
    pool.copy_(torch.randn(pool.shape, generator=g).to(dtype))

    slots, starts = [], [0]
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        pos = torch.arange(n - ql, n)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
        starts.append(starts[-1] + ql)
    slots.append(torch.full((num_padding_tokens,), -1, dtype=torch.int64))
    slot_mapping = torch.cat(slots)
    num_tokens = slot_mapping.numel()
    flat_k = kv_cache[0].view(-1, num_kv_heads, head_dim)
    flat_v = kv_cache[1].view(-1, num_kv_heads, head_dim)
    real = slot_mapping[: starts[-1]].to(device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    k[: starts[-1]] = flat_k[real]
    v[: starts[-1]] = flat_v[real]
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    return PagedBatch(
        q=q, k=k, v=v, kv_cache=kv_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=slot_mapping.to(device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
    )


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel fails to write fails the test."""
    return torch.full_like(x, float("nan"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), f"{int(actual.isnan().sum())} elements unwritten or NaN"
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[dtype])
