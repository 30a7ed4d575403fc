"""Launch configs of the paged prefill kernel: the default rules and a dispatch table filled from the H200 sweep.

No single config won every prefill shape on the H200 (bench/results/prefill_2026-11-29_h200.md), so the
launcher picks per launch from what it knows without a device sync: head_dim, the GQA group, the dtype's
width, whether any sequence has a cached prefix (the backend's has_prefix) and the longest query chunk
(max_query_len, or the token count as its upper bound) in QUERY_BUCKETS. Keys missing from the table take
the default rules. `bench/prefill_sweep.py` prints the table it would write from its winners.

Every config the table can pick for a model is a separate compiled kernel: the engine's warm-up runs its
steps once under each (`table_configs`, `forced_config`) so no compile lands in a served step.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

# Every key a config may set, with the default rules' values for a 16-bit d-128 launch on the H200
# (round 2's best on 8 x 2048: two 8-warp programs per SM under a 128-register cap, 2 stages).
BASE = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128, NEW_KV="tma", BLOCK_N_PAGED=None,
            PACK_GQA=True, BLOCKWISE=False, REVERSE=True, PAIR_TILES=False, LAZY_RESCALE=False, SEQ_VEC=32,
            Q_SCALED=False, LOOP_STAGES=0, LOOP_UNROLL=0, LOOP_WS=False, OVERLAP_QK=False,
            BLOCK_N_TAIL=None, ONE_LOOP=0, PERSISTENT=0, HEAVY_FIRST=False, GLUON=False, PV_ASYNC=False,
            GLUON_WS=False, WS_REGS=None, PINGPONG=False, Q_BUFS=2,
            DYNAMIC=False, AHEAD=False, TMA_STORE=False, CHUNK_LIST=False, TRITON=None)

# The longest query chunk of the launch: < 1024 (chunks, extends, decodes mixed in), < 4096, >= 4096.
QUERY_BUCKETS = (1024, 4096)

# (head_dim, group, dtype bytes, has_prefix, query bucket) -> the keys that differ from BASE.
# Filled from the H200 sweeps (32 q / 8 kv heads, d 128, bf16; bench/results/prefill_2026-11-29_h200.md, round 4):
# 1 x 8192 fresh: 128-key tiles, the diagonal in 32-key tiles, 3 stages, no register cap (one 8-warp program
# per SM) 98% of SDPA against BASE's 86%; 8 x 2048 fresh: BASE with paired query tiles 88% against 86% (until round 6);
# 8 x (2048 + 512), 32 x 512 fresh and 4 x (2048 + 2048): BASE itself (124%, 77%, 130%).
# Round 5 (bench/results/prefill_sweep_2026-11-29_h200_round5.txt): 32 x 512 fresh (the < 1024 key) takes 64-row
# 4-warp programs (three per SM under a 168-register cap), 32-key tiles, 3 stages and the diagonal in the free
# tiles' loop (ONE_LOOP 2): 77-80% of SDPA timed explicitly in rounds 5 and 6, BASE 58-77% (32 x 512 timings
# moved by up to 20% within a run). SEQ_VEC stays 32 (64 measured within 1%): the engine's warm-up steps stop at
# 48 sequences, so only SEQ_VEC 32's two builds are sure to be compiled there.
# Round 6 (..._round6.txt): 8 x 2048 (the 1024-4095 key) takes the >= 4096 pick too, 128-key tiles with a 32-key
# diagonal, 3 stages, no cap: best on 8 x 2048 in rounds 5 and 6 (87.7%, 88.3%) against paired tiles' 83-87%.
# Rounds 1-6's picks for the fresh keys are replaced below; the prefix keys (has_prefix True) stay BASE.
# Round 8 (..._round8.txt, 18:54 UTC): every fresh-prompt key takes the persistent warp-specialized Gluon kernel
# (kernels/paged_prefill_gluon.py, GLUON_WS; Hopper only, other devices run the Triton kernel with these keys):
# >= 1024 tokens: 128-key tiles, three stages with one q buffer per consumer, FlashAttention-3's order, ping-pong,
# heaviest-first items from a global counter: 93.9% of SDPA on 8 x 2048 and 108.0% at 8192, against the Triton
# pick's 86.0% and 100.6% in the same run; < 1024 tokens: 64-key tiles, three stages, the static walk: 82.7% (round 7:
# 83.6%) on 32 x 512 against 78.1% (80.7%).
# TRITON: the Triton pick each entry had before (rounds 5-6), for the launches the Gluon kernel does not serve.
# Session 7, round 4 (bench/results/prefill_sweep_2026-11-29_h200_s7_round4.txt, 21:56 UTC): < 1024 tokens adds
# TMA_STORE (each consumer's output through a staging buffer and TMA, not scattered 4-byte stores from the wgmma
# layout) and AHEAD (the next item's mapping one item early): 101.4% of SDPA on 32 x 512 (100.0% with TMA_STORE
# alone, 98.7% timed again last in the run) against this key's previous pick's 82.0-82.5% in the same run; the
# >= 1024 keys keep their pick (AHEAD on it moved 8 x 2048 and 8192 within the run's drift).
_WS_FRESH = dict(GLUON=True, GLUON_WS=True, BLOCK_N=64, num_stages=3, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2,
                 PINGPONG=True, PERSISTENT=1, HEAVY_FIRST=True,
                 TRITON=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168, ONE_LOOP=2))
_WS_SHORT_FRESH = dict(_WS_FRESH, TMA_STORE=True, AHEAD=True)
_WS_LONG_FRESH = dict(_WS_FRESH, BLOCK_N=128, Q_BUFS=1, DYNAMIC=True,
                      TRITON=dict(BLOCK_N=128, num_stages=3, maxnreg=None, BLOCK_N_TAIL=32))
# Session 8 (bench/results/chat_kernels_2026-11-30_h200_r1.json, ..._r2.json): launches with a cached prefix under
# 1,024 query tokens are, in the engine, its mixed steps of fewer than 1,024 tokens (graphs pass the token bucket as
# max_query_len): the chat's mean one, 254 decodes beside a 343-token prompt, took 24.3 us a layer with BASE, of
# which the 254 decode rows' tile slots (a binary search each) ~10.6 us (13.7 us for the prompt alone). CHUNK_LIST
# walks the prompts' tiles alone (kernels/paged_prefill.py): on the GPU its chat run gave session 6's tokens bit for
# bit and 71.0% of the roofline (round 2; 69.2% without it in round 1).
# Session 9: 64-row 4-warp programs over 32-key tiles walking the list, 3 per SM: per launch 11.9 us at the chat's
# mean mixed step against 16.9 for BASE's tiles with the list, 19.2 against 24.7 at 250 decodes beside prompts of
# 120 and 600 tokens (session 8's final call, bench/results/chat_kernels_2026-11-30_h200_final.json); whole
# mixed steps replayed from their graphs on one engine, arms alternated three times (bench/chat_steps.py, round 2:
# bench/results/chat_steps_2026-11-30_h200_s9_r2.json): 254 decodes + a 343-token prompt 19.66 against 19.81 ms,
# 200 + 100: 12.52 / 12.66, 250 + 120 and 600: 27.03 / 27.15, but 60 decodes + a 900-token prompt 23.07 / 22.95
# (fewer, longer query tiles: 64-row items are half as many programs' work apiece). The graphs see only the token
# bucket, so one pick serves all: the 64-row tiles (the chat's mixed steps are mostly ~254 decodes + a prompt).
_PREFIX_SHORT_BASE = dict(CHUNK_LIST=True, PERSISTENT=2)
_PREFIX_SHORT = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168, ONE_LOOP=2, CHUNK_LIST=True,
                     PERSISTENT=3)
TABLE: dict[tuple, dict] = {
    (128, 4, 2, True, 0): _PREFIX_SHORT,
    (128, 4, 2, False, 0): _WS_SHORT_FRESH,
    (128, 4, 2, False, 1): _WS_LONG_FRESH,
    (128, 4, 2, False, 2): _WS_LONG_FRESH,
}

SHORT_PICK_ENV = "FOLIO_PREFILL_SHORT_PICK"
"""Set to "ws" for A/B runs: the < 1024 fresh key takes its pick from before session 7's round 4 (_WS_FRESH:
no TMA_STORE, no AHEAD)."""

CHUNK_LIST_ENV = "FOLIO_PREFILL_CHUNK_LIST"
"""Set to 0 for A/B runs: no launch walks the step's chunk list (CHUNK_LIST, kernels/paged_prefill.py); the
table's other keys stay."""

PREFIX_PICK_ENV = "FOLIO_PREFILL_PREFIX_PICK"
"""Set to "base" for A/B runs: the < 1024 prefix key (the engine's small mixed steps) takes its pick of session 8
(_PREFIX_SHORT_BASE: BASE's tiles walking the chunk list, 2 per SM) instead of the 64 x 32 tiles."""

_forced: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prefill_forced_config", default=None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def query_bucket(max_query_len: int) -> int:
    return sum(max_query_len >= b for b in QUERY_BUCKETS)


def default_config(head_dim: int, dtype: torch.dtype) -> dict:
    """The rules for launches the table does not cover."""
    cfg = dict(BASE)
    if _interpreting():
        cfg.update(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, maxnreg=None)
    elif dtype == torch.float32 or head_dim >= 256:
        cfg.update(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, maxnreg=None)
    return cfg


def table_key(head_dim: int, group: int, dtype: torch.dtype, has_prefix: bool, max_query_len: int) -> tuple:
    return (head_dim, group, torch.empty((), dtype=dtype).element_size(), bool(has_prefix),
            query_bucket(max_query_len))


def select_config(head_dim: int, group: int, dtype: torch.dtype, has_prefix: bool, max_query_len: int,
                  use_table: bool = True) -> dict:
    """The config for one launch: a forced one (warm-up), else the table's entry over BASE, else the rules.
    use_table=False (every key read through the block table: no step k/v, or an fp8 cache; the sweep timed
    none of those) and TRITON_INTERPRET (the table's tiles are the GPU's, slow to interpret) skip the table."""
    forced = _forced.get()
    if forced is not None:
        return dict(forced)
    entry = None if _interpreting() or not use_table else TABLE.get(
        table_key(head_dim, group, dtype, has_prefix, max_query_len))
    if entry is None or dtype == torch.float32:
        cfg = default_config(head_dim, dtype)
    else:
        if entry is _WS_SHORT_FRESH and os.environ.get(SHORT_PICK_ENV) == "ws":
            entry = _WS_FRESH
        elif entry is _PREFIX_SHORT and os.environ.get(PREFIX_PICK_ENV) == "base":
            entry = _PREFIX_SHORT_BASE
        cfg = dict(BASE, **entry)
    if cfg["CHUNK_LIST"] and os.environ.get(CHUNK_LIST_ENV) == "0":
        cfg.update(CHUNK_LIST=False, PERSISTENT=0)
    return cfg


def table_configs(head_dim: int, group: int, dtype: torch.dtype) -> list[dict]:
    """Every distinct config select_config can return for this head layout and dtype (any has_prefix, any
    query length): what a warm-up must compile."""
    out = [default_config(head_dim, dtype)]  # launches that skip the table
    for has_prefix in (False, True):
        for bucket_len in (0, *QUERY_BUCKETS):
            cfg = select_config(head_dim, group, dtype, has_prefix, bucket_len)
            if cfg not in out:
                out.append(cfg)
    return out


def heavy_first_tiles(cfg: dict, max_query_len: int | None, num_seqs: int, block_q: int, plain_tiles: int) -> int:
    """HEAVY_FIRST's grid for a launch: the longest chunk's query tiles (the grid is num_seqs x that), or 0 for the
    plain mapping. It needs max_query_len, and is skipped where the spare slots (shorter chunks) would more than
    double the plain grid of plain_tiles slots (a long prompt beside many decodes), so empty programs never
    outnumber working ones. Both prefill kernels' launchers (Triton, Gluon) use this one rule."""
    if not cfg.get("HEAVY_FIRST"):
        return 0
    if cfg.get("PAIR_TILES"):
        raise ValueError("HEAVY_FIRST and PAIR_TILES are exclusive (both choose the order of a sequence's tiles)")
    if max_query_len is None:
        return 0
    max_q_tiles = -(-max_query_len // block_q)
    return max_q_tiles if num_seqs * max_q_tiles <= 2 * plain_tiles else 0


@contextlib.contextmanager
def forced_config(cfg: dict | None):
    """Within the block every paged_prefill launch without an explicit config uses `cfg` (None: no change)."""
    token = _forced.set(None if cfg is None else dict(cfg))
    try:
        yield
    finally:
        _forced.reset(token)
