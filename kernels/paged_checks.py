"""Host-side checks shared by the paged-attention wrappers (decode and prefill/extend)."""

from __future__ import annotations

import torch


def check_paged_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                       num_seqs: int, q_rows: str) -> None:
    """q [q_rows, num_heads, head_dim]; kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim];
    block_tables int32 [>= num_seqs, max_blocks]; seq_lens int32 [>= num_seqs]."""
    if q.dim() != 3:
        raise ValueError(f"q must be [{q_rows}, num_heads, head_dim]; got {tuple(q.shape)}")
    _, num_heads, head_dim = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, {head_dim}]; "
                         f"got {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in [1, 256]; got {head_dim}")
    if q.dtype != kv_cache.dtype and kv_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q dtype {q.dtype} != kv_cache dtype {kv_cache.dtype} (the cache must be in q's dtype "
                         f"or float8_e4m3fn)")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] < num_seqs:
        raise ValueError(f"block_tables must be int32 [>= {num_seqs}, max_blocks]; "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if seq_lens.dtype != torch.int32 or seq_lens.dim() != 1 or seq_lens.shape[0] < num_seqs:
        raise ValueError(f"seq_lens must be int32 [>= {num_seqs}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}")


def check_query_start_loc(query_start_loc: torch.Tensor) -> None:
    """query_start_loc int32 [num_seqs + 1] (the launchers take num_seqs from its length)."""
    if query_start_loc.dtype != torch.int32 or query_start_loc.dim() != 1:
        raise ValueError(f"query_start_loc must be int32 [num_seqs + 1]; got {query_start_loc.dtype} "
                         f"{tuple(query_start_loc.shape)}")


def check_kv_scales(k_scale: float, v_scale: float) -> None:
    """An fp8 cache's per-tensor scales: finite and positive."""
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"{name} must be finite and > 0; got {value}")
