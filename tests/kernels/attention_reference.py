"""An independent float64 attention for the AttentionParams variants, and paged batches built from
dense per-sequence K/V, shared by the torch-backend and Triton variant tests.

The reference is written plainly from the definitions in services/engine/attention/params.py: it
never touches the paged layout, so a block-table or slot error in a backend cannot cancel out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.params import AttentionParams


@dataclass
class VariantBatch:
    q: torch.Tensor  # [num_tokens, Hq, D] the step's new tokens
    k: torch.Tensor  # [num_tokens, Hkv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # new tokens' slots hold NaN: the backend must write them
    meta: AttentionMetadata
    dense_k: list[torch.Tensor]  # per sequence [seq_len, Hkv, D], float64
    dense_v: list[torch.Tensor]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes (as BLOOM/MPT compute them), float32 [num_heads]."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def make_variant_batch(steps: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                       block_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                       sliding_window: int | None = None, num_padding_tokens: int = 0,
                       new_in_cache: bool = False) -> VariantBatch:
    """steps: (seq_len, query_len) per sequence. Block tables are a random permutation of the pool;
    unused pool blocks hold random K/V. With sliding_window, the table entries of blocks wholly before
    every new token's window point at a NaN-filled block, as if the block manager had freed them and
    the block had been reused: a backend that reads them fails. The new tokens' slots hold NaN (the
    backend must write them) unless new_in_cache (for calling a kernel directly)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [s for s, _ in steps]
    query_lens = [q for _, q in steps]
    nblocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(nblocks) + 3  # + spare blocks; the last one is the poisoned "reused" block
    perm = torch.randperm(num_blocks - 1, generator=g)
    poison = num_blocks - 1
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    kv_cache[:, poison] = float("nan")
    tables = torch.zeros(len(steps), max(nblocks) + 1, dtype=torch.int32)
    dense_k, dense_v, slots, qs = [], [], [], []
    used = 0
    for i, (n, ql) in enumerate(steps):
        tables[i, : nblocks[i]] = perm[used: used + nblocks[i]].to(torch.int32)
        used += nblocks[i]
        dk = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        dv = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        pos = torch.arange(n)
        flat = tables[i, pos // block_size].long() * block_size + pos % block_size
        kv_cache[0].view(-1, num_kv_heads, head_dim)[flat] = dk
        kv_cache[1].view(-1, num_kv_heads, head_dim)[flat] = dv
        slots.append(flat[n - ql:])
        if sliding_window is not None:
            first_needed = max(0, n - ql - sliding_window + 1)  # the earliest new token's first key
            tables[i, : first_needed // block_size] = poison
        dense_k.append(dk.double())
        dense_v.append(dv.double())
    slot_mapping = torch.cat(slots + [torch.full((num_padding_tokens,), -1, dtype=torch.int64)])
    new = slot_mapping[slot_mapping >= 0]
    k = torch.cat([dk[n - ql:] for dk, (n, ql) in zip(dense_k, steps)]).to(dtype)
    v = torch.cat([dv[n - ql:] for dv, (n, ql) in zip(dense_v, steps)]).to(dtype)
    pad = torch.randn(num_padding_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    k, v = torch.cat([k, pad]), torch.cat([v, pad])
    if not new_in_cache:
        kv_cache.view(2, -1, num_kv_heads, head_dim)[:, new] = float("nan")
    num_tokens = slot_mapping.numel()
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    starts = [0]
    for ql in query_lens:
        starts.append(starts[-1] + ql)
    meta = AttentionMetadata(
        num_seqs=len(steps), num_tokens=num_tokens,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device), slot_mapping=slot_mapping.to(device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
    )
    return VariantBatch(q.to(device), k.to(device), v.to(device), kv_cache.to(device), meta, dense_k, dense_v)


def reference_attention(batch: VariantBatch, params: AttentionParams) -> torch.Tensor:
    """float64 [num_real_tokens, Hq, D], one query row and head at a time from the definitions."""
    q = batch.q.double().cpu()
    hq, hkv = q.shape[1], batch.dense_k[0].shape[1]
    group = hq // hkv
    rows = []
    for i, (n, ql) in enumerate(zip(batch.meta.seq_lens_cpu, batch.meta.query_lens_cpu)):
        start = int(batch.meta.query_start_loc[i])
        keys = torch.arange(n, dtype=torch.float64)
        for r in range(ql):
            p = n - ql + r
            out = torch.empty(hq, q.shape[2], dtype=torch.float64)
            for h in range(hq):
                kh, vh = batch.dense_k[i][: p + 1, h // group], batch.dense_v[i][: p + 1, h // group]
                s = (kh @ q[start + r, h]) * params.scale
                if params.logit_softcap is not None:
                    s = params.logit_softcap * torch.tanh(s / params.logit_softcap)
                if params.alibi_slopes is not None:
                    s = s + float(params.alibi_slopes[h]) * (keys[: p + 1] - p)
                if params.sliding_window is not None:
                    s[: max(0, p - params.sliding_window + 1)] = float("-inf")
                e = torch.exp(s - s.max())
                denom = e.sum()
                if params.sinks is not None:
                    denom = denom + torch.exp(float(params.sinks[h]) - s.max())
                out[h] = (e / denom) @ vh
            rows.append(out)
    return torch.stack(rows)
