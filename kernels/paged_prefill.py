"""Paged prefill / extend attention: a variable-length chunk of new tokens per sequence, causal.

The cache already holds this step's K/V (reshape_and_cache ran first), so sequence i's chunk of
q_len new tokens sits at positions seq_len - q_len ... seq_len - 1 and attends to every cached
position up to its own. One launch serves a whole step: prefill chunks, prefix-cache extends and
decodes (q_len 1) together.

FlashAttention-2 style: a program owns BLOCK_M query rows and streams BLOCK_N-token K/V tiles through
an online softmax with tl.dot. With PACK_GQA the rows are (token, query head) pairs: BLOCK_Q = BLOCK_M // G
tokens times the G query heads that share the KV head, so each K/V tile is read once for its whole
group and a decode token still fills G rows; without it a program owns BLOCK_M tokens of one head.

Two key sources. Keys before the chunk (the cached prefix) are gathered through the block table. The
chunk's own keys are read, with NEW_KV, from the step's contiguous k/v (the tensors reshape_and_cache
just wrote: the same values) with plain loads (NEW_KV_PTR) or TMA tensor descriptors (NEW_KV_TMA);
without NEW_KV they too come through the block table. Within each source the tiles wholly visible
to every row of the program take an unmasked loop; only the diagonal (and a window's leading edge,
and a source's last partial tile) take the masked one.

Programs map to (sequence, query tile) without a host sync: sequence i's tiles start at
query_start_loc[i] // BLOCK_Q + i (an upper bound on the tiles before it), so the grid is
num_tokens // BLOCK_Q + num_seqs and each program finds its sequence by binary search; spare
programs of a sequence exit at once. With CHUNK_LIST (a mixed step's host-made list of the sequences with more than
one new token, `chunk_list`) a persistent grid walks those sequences' tiles alone: the decode rows (skip_single), a
slot and a search each in the plain grid, cost nothing. With REVERSE a sequence's last (longest) query tiles run first.
With HEAVY_FIRST (and the host's max_query_len) the grid is instead num_seqs x the longest chunk's tiles, slot
r * num_seqs + i being sequence i's chunk tile max_q_tiles - 1 - r: no search, and within a head group every
sequence's heaviest tiles run before any lighter one (longest-processing-time order for fresh prompts).

An fp8 cache (float8_e4m3fn, KV_FP8) is upcast to q's dtype as each tile is loaded; k_scale rides in the
softmax scale (the host multiplies them) and v_scale multiplies the output once at the end. The
contiguous k/v are not quantized, so an fp8 cache reads every key through the block table.

Files: this one is the host side (paged_prefill: checks, config, launch; make_chunk_list); the kernel and its grid
mapping are kernels/paged_prefill_kernel.py, its key loop kernels/paged_prefill_span.py, the launch tables and picker
kernels/paged_prefill_configs.py, the Gluon kernel for fresh prompts kernels/paged_prefill_gluon.py and the torch
reference kernels/paged_prefill_ref.py.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.paged_checks import check_kv_scales, check_paged_inputs, check_query_start_loc
from kernels.paged_common import head_dim_pad, kernel_variants
from kernels.paged_prefill_configs import BASE, heavy_first_tiles, select_config
from kernels.paged_prefill_kernel import _paged_prefill_kernel
from kernels.paged_prefill_ref import paged_prefill_ref
from kernels.splitk import sm_count

try:  # Hopper's Gluon kernel for fresh prompts (config GLUON); absent from older Triton builds
    from kernels import paged_prefill_gluon
except ImportError:  # pragma: no cover - depends on the installed Triton
    paged_prefill_gluon = None

__all__ = ["NEW_KV_MODES", "make_chunk_list", "paged_prefill", "paged_prefill_ref"]

# Where the chunk's own keys come from (the NEW_KV constexpr).
NEW_KV_PAGED, NEW_KV_PTR, NEW_KV_TMA = 0, 1, 2
NEW_KV_MODES = {"paged": NEW_KV_PAGED, "ptr": NEW_KV_PTR, "tma": NEW_KV_TMA}


def _new_kv_mode(mode: str, k: torch.Tensor | None, v: torch.Tensor | None, q: torch.Tensor,
                 kv_cache: torch.Tensor) -> int:
    """The NEW_KV constexpr for the requested mode: the block table when no k/v are given or the cache
    is fp8; "tma" falls back to plain loads where a descriptor cannot describe k/v."""
    if mode not in NEW_KV_MODES:
        raise ValueError(f"NEW_KV must be one of {sorted(NEW_KV_MODES)}; got {mode!r}")
    if k is None or v is None or mode == "paged" or kv_cache.dtype == torch.float8_e4m3fn:
        return NEW_KV_PAGED
    if mode == "tma":
        head_dim = q.shape[2]
        row_bytes_ok = all(t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in (k, v))
        if head_dim == head_dim_pad(head_dim) and all(t.stride(1) == head_dim for t in (k, v)) and row_bytes_ok:
            return NEW_KV_TMA
    return NEW_KV_PTR


def _check_new_kv(k: torch.Tensor | None, v: torch.Tensor | None, q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is None:
        return
    want = (q.shape[0], kv_cache.shape[3], q.shape[2])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want or t.dtype != q.dtype or t.stride(2) != 1:
            raise ValueError(f"{name} must be {q.dtype} [num_tokens, num_kv_heads, head_dim] = {list(want)} and "
                             f"contiguous in head_dim; got {t.dtype} {tuple(t.shape)} strides {t.stride()}")


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    has_prefix: bool = True,
    skip_single: bool = False,
    max_query_len: int | None = None,
    chunk_list: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached tokens up to itself.

    q [num_tokens, num_heads, head_dim] (sequence i owns rows query_start_loc[i]:query_start_loc[i+1]);
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] already holding these tokens' K/V;
    block_tables int32 [num_seqs, max_blocks]; seq_lens int32 [num_seqs]; query_start_loc int32
    [num_seqs + 1]. Rows after query_start_loc[-1] (padding) are left unwritten.
    sliding_window, logit_softcap, alibi_slopes, sinks: as in AttentionParams (docs/attention-seam.md);
    with a window, block-table entries of blocks wholly before the window of the sequence's first new
    token are never read.
    k_scale, v_scale: a float8_e4m3fn cache holds k / k_scale and v / v_scale (unused for other caches).
    k, v: optionally this step's new K/V [num_tokens, num_kv_heads, head_dim] in q's dtype (what
    reshape_and_cache wrote; rows may be strided, e.g. views of a fused qkv, and must be finite); with
    them the chunk's own keys are read contiguously (config NEW_KV), the cached prefix through the table.
    has_prefix=False promises that every sequence is a fresh prompt (seq_len == its query count), so with
    k/v the kernel is compiled without its block-table path; it is ignored without k/v.
    skip_single: leave the rows of sequences with exactly one new token unwritten (a mixed step's decode
    rows, which paged_decode(query_start_loc=...) attends to at the decode kernel's rate).
    chunk_list: with skip_single, the sequences with more than one new token as make_chunk_list writes them (int32
    [2, >= num_seqs + 1]); with a config whose CHUNK_LIST is set the launch walks their tiles alone on a persistent
    grid (PERSISTENT programs per SM, 2 if unset), not a tile slot per sequence: a mixed step's decode rows then
    cost no programs. Under a CUDA graph the list is refreshed per replay like query_start_loc.
    max_query_len: the longest sequence's query count (or any bound at least that), if the host knows it (else
    num_tokens bounds it); with has_prefix, head_dim, the group and the dtype it picks the config
    (kernels/paged_prefill_configs.py), and HEAVY_FIRST sizes its grid by it.
    config: BLOCK_M, BLOCK_N, BLOCK_N_PAGED, num_warps, num_stages, NEW_KV ("paged" / "ptr" / "tma"), PACK_GQA,
    BLOCKWISE, REVERSE, PAIR_TILES, LAZY_RESCALE, SEQ_VEC, Q_SCALED, LOOP_STAGES, LOOP_UNROLL, LOOP_WS,
    OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP, PERSISTENT, HEAVY_FIRST (see the kernel), maxnreg (optional); GLUON (and
    PV_ASYNC, GLUON_WS, WS_REGS, PINGPONG, Q_BUFS, DYNAMIC, AHEAD, TMA_STORE): launches kernels/paged_prefill_gluon.py
    supports (fresh prompts, k/v, 16-bit, no variants, sm_90) take a Gluon kernel with BLOCK_M, BLOCK_N, num_warps,
    num_stages, SEQ_VEC, maxnreg, the rest the Triton kernel; unset keys take the selected config's.
    Returns out [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = query_start_loc.shape[0] - 1
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, num_seqs, "num_tokens")
    check_query_start_loc(query_start_loc)
    _check_new_kv(k, v, q, kv_cache)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        check_kv_scales(k_scale, v_scale)
        scale = scale * k_scale  # q . (k / k_scale) * (scale * k_scale) = scale * q . k
    variants = kernel_variants(scale, num_heads, q.device, sliding_window, logit_softcap, alibi_slopes, sinks)
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    if max_query_len is not None and max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0; got {max_query_len}")
    longest = num_tokens if max_query_len is None else max_query_len
    use_table = k is not None and not fp8  # the table was measured with the chunk's keys read from k/v
    cfg = dict(select_config(head_dim, group, q.dtype, has_prefix, longest, use_table), **(config or {}))
    has_variants = any(x is not None for x in (sliding_window, logit_softcap, alibi_slopes, sinks))
    if (cfg.get("GLUON") and paged_prefill_gluon is not None and cfg["BLOCK_M"] % group == 0
            and paged_prefill_gluon.supported(q, k, v, group, fp8, has_variants, has_prefix)):
        return paged_prefill_gluon.prefill_fresh(q, k, v, query_start_loc, scale, out, cfg, skip_single,
                                                 max_query_len)
    if cfg.get("GLUON") and cfg.get("TRITON"):
        # A table entry naming the Gluon kernel also names the Triton config for the launches that kernel does not
        # serve (another GPU, soft-cap / ALiBi / window / sinks, strides TMA cannot take).
        cfg = dict(BASE, **cfg["TRITON"])
    row_heads = group if cfg["PACK_GQA"] else 1
    block_m = max(cfg["BLOCK_M"], 16, triton.next_power_of_2(row_heads))
    block_q = block_m // row_heads
    block_n = cfg["BLOCK_N"]
    new_kv = _new_kv_mode(cfg["NEW_KV"], k, v, q, kv_cache)
    if new_kv == NEW_KV_TMA:
        k_new, v_new = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                                         [block_n, head_dim]) for t in (k, v))
    elif new_kv == NEW_KV_PTR:
        k_new, v_new = k, v
    else:
        k_new = v_new = q  # unread
    block_n_paged = (cfg.get("BLOCK_N_PAGED") or block_n) if new_kv != NEW_KV_PAGED else block_n
    block_n_tail = min(cfg.get("BLOCK_N_TAIL") or block_n, block_n) if new_kv != NEW_KV_PAGED else block_n
    if block_n % block_n_tail:
        raise ValueError(f"BLOCK_N_TAIL must divide BLOCK_N ({block_n}); got {block_n_tail}")
    if block_n_tail < block_n and new_kv == NEW_KV_TMA:
        k_tail, v_tail = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                                           [block_n_tail, head_dim]) for t in (k, v))
    else:
        k_tail, v_tail = k_new, v_new
    k_strides = k.stride()[:2] if k is not None else (0, 0)
    v_strides = v.stride()[:2] if v is not None else (0, 0)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    tiles_per_program = 2 if cfg["PAIR_TILES"] else 1
    num_tiles = num_tokens // (block_q * tiles_per_program) + num_seqs
    max_q_tiles = heavy_first_tiles(cfg, max_query_len, num_seqs, block_q, num_tiles)
    heavy_first = max_q_tiles > 0
    if heavy_first:
        num_tiles = num_seqs * max_q_tiles
    persistent = int(cfg.get("PERSISTENT") or 0)
    if chunk_list is not None and (chunk_list.dtype != torch.int32 or chunk_list.dim() != 2
                                   or chunk_list.shape[0] != 2 or chunk_list.shape[1] < num_seqs + 1
                                   or chunk_list.stride(1) != 1 or chunk_list.device != q.device):
        raise ValueError(f"chunk_list must be int32 [2, >= num_seqs + 1 = {num_seqs + 1}] with contiguous rows on "
                         f"{q.device}; got {chunk_list.dtype} {list(chunk_list.shape)} on {chunk_list.device}")
    listed = (chunk_list is not None and skip_single and bool(cfg.get("CHUNK_LIST")) and not cfg["PAIR_TILES"]
              and not heavy_first)
    if listed:
        persistent = persistent or 2
        grid = (persistent * sm_count(q.device),)
    elif persistent:
        grid = (min(num_tiles * (num_heads // row_heads), persistent * sm_count(q.device)),)
    else:
        grid = (num_tiles, num_heads // row_heads)
    _paged_prefill_kernel[grid](
        q, key_cache, value_cache, k_new, v_new, k_tail, v_tail, block_tables, seq_lens, query_start_loc, out,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_bt=block_tables.stride(0),
        stride_cb=key_cache.stride(0), stride_cs=key_cache.stride(1), stride_ch=key_cache.stride(2),
        stride_kt=k_strides[0], stride_kh=k_strides[1], stride_vt=v_strides[0], stride_vh=v_strides[1],
        num_seqs=num_seqs,
        num_tiles=num_tiles,
        max_q_tiles=max_q_tiles,
        chunks_ptr=chunk_list if listed else query_start_loc,
        stride_chunks=chunk_list.stride(0) if listed else 0,
        QUERIES_PER_KV=group,
        ROW_HEADS=row_heads,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_N_PAGED=block_n_paged,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        D_MASKED=head_dim != head_dim_pad(head_dim),
        BLOCK_SIZE=block_size,
        NEW_KV=new_kv,
        BLOCKWISE=bool(cfg["BLOCKWISE"]) and block_n_paged % block_size == 0,
        REVERSE=bool(cfg["REVERSE"]),
        PAIR_TILES=int(bool(cfg["PAIR_TILES"])),
        SKIP_SINGLE=bool(skip_single),
        LAZY_RESCALE=bool(cfg["LAZY_RESCALE"]),
        HAS_PREFIX=bool(has_prefix) or new_kv == NEW_KV_PAGED,
        Q_SCALED=bool(cfg.get("Q_SCALED")),
        LOOP_STAGES=int(cfg.get("LOOP_STAGES") or 0),
        LOOP_UNROLL=int(cfg.get("LOOP_UNROLL") or 0),
        LOOP_WS=bool(cfg.get("LOOP_WS")),
        OVERLAP_QK=bool(cfg.get("OVERLAP_QK")),
        BLOCK_N_TAIL=block_n_tail,
        ONE_LOOP=int(cfg.get("ONE_LOOP") or 0),
        PERSISTENT=persistent,
        NUM_HEAD_GROUPS=num_heads // row_heads,
        HEAVY_FIRST=heavy_first,
        CHUNK_LIST=listed,
        # two compiled versions at most; HEAVY_FIRST reads no search, so one
        SEQ_VEC=cfg["SEQ_VEC"] if num_seqs < cfg["SEQ_VEC"] and not heavy_first else 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=fp8,
        v_scale=v_scale,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),  # a register cap: 2 programs per SM
        **variants.launch_args(seq_lens),
    )
    return out


def make_chunk_list(query_lens, out=None):
    """paged_prefill's chunk_list from a step's per-sequence new-token counts (a numpy int array or a list): int32
    [2, num_seqs + 1], row 0 the prefix sums of the counts of sequences with more than one new token (then the
    total repeated), row 1 their number, then their indices. `out`: a numpy int32 array of at least that shape
    to fill (pinned staging); returned trimmed to num_seqs + 1 columns."""
    q = np.asarray(query_lens, dtype=np.int64)
    n = q.shape[0]
    idx = np.flatnonzero(q > 1)
    buf = np.zeros((2, n + 1), dtype=np.int32) if out is None else out[:, :n + 1]
    buf[0, 0] = 0
    np.cumsum(q[idx], out=buf[0, 1:len(idx) + 1])
    buf[0, len(idx) + 1:] = buf[0, len(idx)]
    buf[1, 0] = len(idx)
    buf[1, 1:len(idx) + 1] = idx
    buf[1, len(idx) + 1:] = 0
    return buf
