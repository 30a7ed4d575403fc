"""Builders for paged-attention test batches, shared by tests/kernels and tests/gpu."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from services.engine.attention.kv_quant import quantize_kv_fp8
from services.engine.attention.metadata import AttentionMetadata

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


def assert_skip_single(out: torch.Tensor, expected: torch.Tensor, query_start_loc: torch.Tensor, q_lens: list[int],
                       dtype: torch.dtype) -> None:
    """A skip_single launch's output: the rows of sequences with more than one query token match `expected`,
    the single-token sequences' rows and the padding after the last sequence are left as they were (NaN)."""
    starts = query_start_loc.tolist()
    for i, ql in enumerate(q_lens):
        rows = slice(starts[i], starts[i + 1])
        if ql > 1:
            assert_close(out[rows], expected[rows], dtype)
        else:
            assert out[rows].isnan().all()
    assert out[starts[len(q_lens)]:].isnan().all()


def hard_e4m3_values() -> torch.Tensor:
    """Every e4m3 rounding case: exact values, the midpoints between neighbours (ties, including the ones
    that carry into the next power of two), the subnormal range, beyond +-448 (clamped), signed zeros."""
    finite = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 ... 448
    mids = (finite[1:] + finite[:-1]) / 2
    nudged = torch.cat([mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)])
    wide = torch.logspace(-12, 4, 1000, base=2.0) * torch.linspace(1.0, 1.9, 1000)
    out_of_range = torch.tensor([448.5, 460.0, 464.0, 500.0, 1e4, 1e30])
    pos = torch.cat([finite, mids, nudged, wide, out_of_range])
    return torch.cat([pos, -pos, torch.tensor([0.0, -0.0])])


def fp8_batch(device, steps, dtype, k_scale, v_scale, num_heads=9, num_kv_heads=3, head_dim=64):
    """A make_batch step whose pool is stored in fp8 with the given scales (K/V spread over a wide range).
    Returns q, k, v (this step's new tokens, in dtype), the fp8 cache (their slots hold NaN bytes, for the
    backend to write) and the AttentionMetadata."""
    seq_lens, query_lens = map(list, zip(*steps))
    batch = make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, 16, torch.float32, device)
    spread = torch.logspace(-3, 0.5, head_dim, device=device)  # channel magnitudes from subnormal to ~3
    cache = quantize_kv_fp8(batch.kv_cache * spread, k_scale, v_scale)
    # New slots hold NaN (0x7F) bytes: the backend must write them itself.
    cache.view(torch.uint8).view(2, -1, num_kv_heads, head_dim)[:, batch.slot_mapping[batch.slot_mapping >= 0]] = 0x7F
    real = batch.slot_mapping.shape[0]
    k, v = (batch.k[:real] * spread).to(dtype), (batch.v[:real] * spread).to(dtype)
    meta = AttentionMetadata(
        num_seqs=len(seq_lens), num_tokens=real, query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
        block_tables=batch.block_tables, slot_mapping=batch.slot_mapping, max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len, query_lens_cpu=batch.query_lens_cpu, seq_lens_cpu=batch.seq_lens_cpu)
    return batch.q.to(dtype), k, v, cache, meta
