"""Hopper-only prefill kernels in Gluon for launches of fresh prompts: explicit async wgmma, TMA ring, overlap.

The Triton kernel (kernels/paged_prefill.py) stays the reference, the CPU path and every other case; this one
serves only what the dispatch table sends it (config GLUON): sequences without a cached prefix (has_prefix
False), the chunk's keys from the step's contiguous k/v through TMA, 16-bit q/k/v, head_dim 64 or 128, no
window, soft-cap, ALiBi, sinks or fp8 cache. Gluon kernels do not run under TRITON_INTERPRET; tests/gpu checks
this one against the torch reference.

Same program mapping as the Triton kernel (PACK_GQA rows: BLOCK_Q tokens x the GROUP query heads sharing a KV
head; tile slots query_start_loc[i] // BLOCK_Q + i; a sequence's last query tiles first). What Triton 3.6 does
not give, written out here:
  - K and V tiles arrive through a STAGES-deep TMA ring with one mbarrier per slot and tensor, issued as soon
    as a slot is free, so loads never wait behind the softmax;
  - the next tile's QK^T wgmma is issued before this tile's softmax and left in flight (FlashAttention-3's
    intra-warpgroup overlap), and the PV wgmma is waited for only where the next rescale of acc needs it.
With GLUON_WS a second kernel (below) splits each program into warp-specialized roles (gl.warp_specialize): a
TMA producer warp and two consumer warpgroups over one K/V ring.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kernels.paged_prefill_configs import heavy_first_tiles
from kernels.splitk import sm_count


@gluon.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: gl.constexpr, SEQ_VEC: gl.constexpr,
              num_warps: gl.constexpr):
    """(sequence, first query row, query count) of tile slot `tile`: the last i with
    query_start_loc[i] // BLOCK_Q + i <= tile (vector loads below SEQ_VEC sequences, else a binary search)."""
    if SEQ_VEC > 0:
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        idx = gl.arange(0, SEQ_VEC, layout=layout)
        starts = gl.load(query_start_loc_ptr + idx, mask=idx <= num_seqs, other=0)
        before = (starts // BLOCK_Q + idx <= tile) & (idx < num_seqs)
        seq = gl.sum(before.to(gl.int32), 0) - 1
        q_start = gl.sum(gl.where(idx == seq, starts, 0), 0)
        q_len = gl.sum(gl.where(idx == seq + 1, starts, 0), 0) - q_start
    else:
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if gl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        q_start = gl.load(query_start_loc_ptr + seq)
        q_len = gl.load(query_start_loc_ptr + seq + 1) - q_start
    return seq, q_start, q_len


@gluon.jit
def _issue(desc, smem, bar, tile_idx, row0, col, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA load of key tile `tile_idx` of one tensor (K or V), if it exists, into ring slot tile_idx % STAGES."""
    slot = tile_idx % STAGES
    pred = tile_idx < n_tiles
    mbarrier.expect(bar.index(slot), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row0 + tile_idx * BLOCK_N, col], bar.index(slot), smem.index(slot),
                                    pred=pred)


@gluon.jit
def _softmax_step(s, m_i, l_i, acc, j, q_pos, first_pos, qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr, MASK_BRANCH: gl.constexpr):
    """Mask key tile j's scores (causal) and fold them into the running max / sum; returns p (q's dtype, still
    in s_layout), alpha for acc and the new m_i, l_i. Only a tile reaching past first_pos (the diagonal, or a
    sequence's end) has keys to mask: MASK_BRANCH skips the compare elsewhere by a runtime branch."""
    if MASK_BRANCH:
        if (j + 1) * BLOCK_N > first_pos + 1:
            pos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    else:
        pos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), m_new, l_i


@gluon.jit(do_not_specialize=["num_seqs"])
def _prefill_fresh_kernel(q_ptr, k_desc, v_desc, query_start_loc_ptr, out_ptr, qk_scale, stride_qt, stride_qh,
                          stride_ot, stride_oh, num_seqs,
                          GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr,
                          HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, SEQ_VEC: gl.constexpr,
                          SKIP_SINGLE: gl.constexpr, PV_ASYNC: gl.constexpr, MASK_BRANCH: gl.constexpr,
                          num_warps: gl.constexpr):
    dtype: gl.constexpr = k_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1],
                                                   [1, 0])
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)

    tile = gl.program_id(0)
    kv_head = gl.program_id(1)
    head0 = kv_head * GROUP
    seq, q_start, q_len = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q, SEQ_VEC, num_warps)
    slot = tile - (q_start // BLOCK_Q + seq)
    n_q_tiles = gl.cdiv(q_len, BLOCK_Q)
    run = slot < n_q_tiles
    if SKIP_SINGLE:
        run = run & (q_len != 1)
    if run:
        q_tile = n_q_tiles - 1 - slot
        first_pos = q_tile * BLOCK_Q
        last_pos = gl.minimum(first_pos + BLOCK_Q, q_len) - 1
        n_tiles = gl.cdiv(last_pos + 1, BLOCK_N)
        col = kv_head * HEAD_DIM

        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
        fence_async_shared()  # the barriers' initialization is visible to the TMA unit before it signals them
        for i in gl.static_range(STAGES):
            _issue(k_desc, k_smem, k_bar, i, q_start, col, n_tiles, BLOCK_N, STAGES)
            _issue(v_desc, v_smem, v_bar, i, q_start, col, n_tiles, BLOCK_N, STAGES)

        # q rows are (token, head) pairs: row r is token first_pos + r // GROUP, head head0 + r % GROUP.
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_load_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_load_layout))
        q_idx = first_pos + rows // GROUP
        q_off = (q_start + q_idx).to(gl.int64) * stride_qt + (head0 + rows % GROUP) * stride_qh
        q = gl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=(q_idx < q_len)[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_smem_layout, q)
        fence_async_shared()

        q_pos = first_pos + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout)) // GROUP
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        # acc is carried through the loop as an accumulator an async wgmma may still be writing.
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

        # Ring discipline (STAGES >= 2): K slot t % STAGES is refilled with tile t + STAGES as soon as QK(t) is
        # done, V's as soon as PV(t) is: K is loaded STAGES tiles ahead of its QK^T, V STAGES - 1 ahead of its PV.
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        _issue(k_desc, k_smem, k_bar, STAGES, q_start, col, n_tiles, BLOCK_N, STAGES)
        for j in range(n_tiles - 1):
            # Issue tile j + 1's QK^T now and let it run under this tile's softmax.
            nxt = (j + 1) % STAGES
            mbarrier.wait(k_bar.index(nxt), ((j + 1) // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, j, q_pos, first_pos, qk_scale, s_layout, o_layout,
                                               BLOCK_N, MASK_BRANCH)
            # In flight: PV(j - 1), then QK(j + 1). Waiting down to one leaves only QK(j + 1): acc is ours,
            # and V slot j - 1 is free for tile j - 1 + STAGES.
            acc = warpgroup_mma_wait(1, deps=(acc,))
            if j >= 1:
                _issue(v_desc, v_smem, v_bar, j - 1 + STAGES, q_start, col, n_tiles, BLOCK_N, STAGES)
            acc = acc * alpha[:, None]
            cur = j % STAGES
            mbarrier.wait(v_bar.index(cur), (j // STAGES) & 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc, is_async=True)
            if not PV_ASYNC:
                # Wait for PV(j) (and QK(j + 1), issued before it) here: with PV(j) left in flight across the
                # loop's back edge ptxas serializes every wgmma of the loop (C7514, Triton 3.6's ptxas).
                acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
            # In flight: QK(j + 1), then PV(j). Down to one: tile j + 1's scores are ready, its K slot free.
            s = warpgroup_mma_wait(1, deps=(s_next,))
            _issue(k_desc, k_smem, k_bar, j + 1 + STAGES, q_start, col, n_tiles, BLOCK_N, STAGES)
        last = n_tiles - 1
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, last, q_pos, first_pos, qk_scale, s_layout, o_layout,
                                           BLOCK_N, MASK_BRANCH)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        acc = acc * alpha[:, None]
        cur = last % STAGES
        mbarrier.wait(v_bar.index(cur), (last // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))

        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        o_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_idx = first_pos + o_rows // GROUP
        o_off = (q_start + o_idx).to(gl.int64) * stride_ot + (head0 + o_rows % GROUP) * stride_oh
        gl.store(out_ptr + o_off[:, None] + o_d[None, :], out.to(dtype), mask=(o_idx < q_len)[:, None])


def supported(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, group: int, fp8: bool,
              has_variants: bool, has_prefix: bool) -> bool:
    """Whether a launch can take the Gluon kernel (else the Triton kernel serves it)."""
    if k is None or v is None or has_prefix or fp8 or has_variants or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9 or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    head_dim = q.shape[2]
    if head_dim not in (64, 128) or group not in (1, 2, 4, 8) or q.stride(2) != 1:
        return False
    return all(t.stride(2) == 1 and t.stride(1) == head_dim and t.stride(0) * t.element_size() % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (k, v))


@functools.lru_cache(maxsize=None)
def _smem_layout(block_n: int, head_dim: int, bf16: bool):
    return gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.bfloat16 if bf16 else gl.float16)


def prefill_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                  out: torch.Tensor, cfg: dict, skip_single: bool = False,
                  max_query_len: int | None = None) -> torch.Tensor:
    """Causal attention of fresh prompts (seq_len == query count per sequence), keys from k/v. cfg: BLOCK_M,
    BLOCK_N, num_warps, num_stages (the TMA ring's depth, >= 2), SEQ_VEC, PV_ASYNC (leave each PV wgmma in flight
    until the next tile's rescale), ONE_LOOP (2: mask only the tiles that reach past the first row, by a
    runtime branch; else every tile), maxnreg; GLUON_WS takes the warp-specialized kernel (prefill_fresh_ws) where
    q can be read by TMA, with HEAVY_FIRST's mapping where heavy_first_tiles allows it (max_query_len).
    The caller checked supported()."""
    if cfg.get("GLUON_WS") and supported_ws(q):
        num_seqs = query_start_loc.shape[0] - 1
        block_q = 128 // (q.shape[1] // k.shape[1])
        max_q_tiles = heavy_first_tiles(cfg, max_query_len, num_seqs, block_q, q.shape[0] // block_q + num_seqs)
        return prefill_fresh_ws(q, k, v, query_start_loc, scale, out, cfg, skip_single, max_q_tiles)
    if cfg["num_stages"] < 2:
        raise ValueError(f"the Gluon prefill kernel's ring needs num_stages >= 2; got {cfg['num_stages']}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = query_start_loc.shape[0] - 1
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_q = block_m // group
    layout = _smem_layout(block_n, head_dim, q.dtype == torch.bfloat16)
    k_desc, v_desc = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                                       [block_n, head_dim], layout) for t in (k, v))
    seq_vec = cfg["SEQ_VEC"] if num_seqs < cfg["SEQ_VEC"] else 0
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_fresh_kernel[grid](
        q, k_desc, v_desc, query_start_loc, out, scale * 1.4426950408889634, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), num_seqs,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim,
        STAGES=cfg["num_stages"], SEQ_VEC=seq_vec, SKIP_SINGLE=bool(skip_single),
        PV_ASYNC=bool(cfg.get("PV_ASYNC")), MASK_BRANCH=cfg.get("ONE_LOOP") == 2, num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return out


# ---- Warp-specialized variant (config GLUON_WS): FlashAttention-3's split of a program into roles ----
# A 1-warp producer loads each work item's q (both halves, double-buffered) and streams its K/V tiles into a
# STAGES-deep ring, all by TMA ("ready" mbarriers; "empty" ones the consumers arrive on when done with a buffer);
# two 4-warp consumer warpgroups each own half of the item's rows and run QK^T -> softmax -> PV over the same
# tiles, never waiting for each other, so one's softmax can run while the other's wgmmas do (the ping-pong that
# FlashAttention-3 enforces with named barriers is left to the warp scheduler). With PERSISTENT the grid is one
# program per SM walking the work items, so the producer loads the next item's q and first tiles while the
# consumers finish the current one (the fixed cost per query tile the Triton kernel pays up front).
# Rows are head-major within each half: consumer c's row r is head head0 + r // TQ, token c * TQ + r % TQ of the
# item's BLOCK_Q tokens (TQ = BLOCK_Q // 2), so each head's TQ tokens are one [TQ, HEAD_DIM] TMA box of q.


@gluon.jit
def _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs, max_q_tiles, BLOCK_Q: gl.constexpr,
             SEQ_VEC: gl.constexpr, HEAVY: gl.constexpr, SKIP_SINGLE: gl.constexpr, WARPS: gl.constexpr):
    """Work item w -> (run it?, q_start, q_len, first token of its query tile, kv head). Every partition computes
    the same answer from the same loads, so they agree on which items run."""
    tile = w % num_tiles
    kv_head = w // num_tiles
    if HEAVY:
        # HEAVY_FIRST's mapping (kernels/paged_prefill.py): slot r * num_seqs + seq is chunk tile max_q_tiles - 1 - r.
        seq = tile % num_seqs
        q_start = gl.load(query_start_loc_ptr + seq)
        q_len = gl.load(query_start_loc_ptr + seq + 1) - q_start
        q_tile = max_q_tiles - 1 - tile // num_seqs
    else:
        seq, q_start, q_len = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q, SEQ_VEC, WARPS)
        q_tile = gl.cdiv(q_len, BLOCK_Q) - 1 - (tile - (q_start // BLOCK_Q + seq))
    run = (q_tile >= 0) & (q_tile < gl.cdiv(q_len, BLOCK_Q))
    if SKIP_SINGLE:
        run = run & (q_len != 1)
    return run, q_start, q_len, q_tile * BLOCK_Q, kv_head


@gluon.jit
def _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, item_smem, w,
                  q_start, q_len, first_pos, kv_head, n, it, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr,
                  DYNAMIC: gl.constexpr):
    """Producer, one runnable work item (the n-th this program runs): both halves of q into q buffer n % Q_BUFS
    (with DYNAMIC the item's index beside it, for the consumers), then its key tiles into ring slots it % STAGES,
    ... each once its consumers freed it. Returns the tiles loaded so far."""
    TQ: gl.constexpr = BLOCK_Q // 2
    for c in gl.static_range(2):
        buf = (n % Q_BUFS) * 2 + c
        mbarrier.wait(q_empty.index(buf), ((n // Q_BUFS) + 1) & 1, pred=n >= Q_BUFS)
        if DYNAMIC:
            _put_item(item_smem, buf, w)
        mbarrier.expect(q_ready.index(buf), GROUP * q_desc.block_type.nbytes)
        for h in gl.static_range(GROUP):
            tma.async_copy_global_to_shared(q_desc, [q_start + first_pos + c * TQ, (kv_head * GROUP + h) * HEAD_DIM],
                                            q_ready.index(buf), q_smem.index(buf).slice(h * TQ, TQ))
    n_tiles = gl.cdiv(gl.minimum(first_pos + BLOCK_Q, q_len), BLOCK_N)
    for j in range(n_tiles):
        it = _ws_load_tile(k_desc, v_desc, k_smem, v_smem, ready, empty, it, q_start + j * BLOCK_N, kv_head * HEAD_DIM,
                           STAGES)
    return it


@gluon.jit
def _ws_load_tile(k_desc, v_desc, k_smem, v_smem, ready, empty, it, row0, col, STAGES: gl.constexpr):
    """Producer: key tile `it` of the ring (K and V rows row0 ..) into slot it % STAGES once its consumers freed
    it. Returns it + 1."""
    slot = it % STAGES
    # The slot's previous tile must be released; the ring's first STAGES tiles find it empty.
    mbarrier.wait(empty.index(slot), ((it // STAGES) + 1) & 1, pred=it >= STAGES)
    mbarrier.expect(ready.index(slot), 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row0, col], ready.index(slot), k_smem.index(slot))
    tma.async_copy_global_to_shared(v_desc, [row0, col], ready.index(slot), v_smem.index(slot))
    return it + 1


@gluon.jit
def _put_item(item_smem, buf, w):
    """Producer: write work item index w (-1: no more) into q buffer buf's item slot (read after its q_ready)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    item_smem.index(buf).store(gl.full([1], w, gl.int32, layout=layout))


@gluon.jit
def _get_item(item_smem, buf):
    """Consumer: the work item index the producer left in q buffer buf's item slot."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(item_smem.index(buf).load(layout), 0)


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, item_smem,
                 counter_ptr, query_start_loc_ptr, num_seqs, max_q_tiles, num_tiles, num_items, GROUP: gl.constexpr,
                 BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 SEQ_VEC: gl.constexpr, HEAVY: gl.constexpr, SKIP_SINGLE: gl.constexpr, Q_BUFS: gl.constexpr,
                 DYNAMIC: gl.constexpr, AHEAD: gl.constexpr):
    """Load every work item this program runs (n = items run so far, it = key tiles loaded so far). The items are
    program_id(0), then every num_programs(0)-th; with DYNAMIC, program_id(0), then the next untaken one from a
    global counter (heaviest first within a head group, so whichever program is free takes the heaviest left:
    longest-processing-time order), ending with index -1 for the consumers."""
    n = 0
    it = 0
    if DYNAMIC:
        w = gl.program_id(0)
        if AHEAD:
            # The next item's ticket is taken before this item's loads and read after them, so the atomic's round
            # trip runs under the loads (a scalar atomic_add waits for its result where it is issued: the lanes
            # get it through shared memory). A lane-0 tensor atomic keeps the result in lane 0's register.
            lanes = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
            ticket = gl.atomic_add(counter_ptr + lanes * 0, gl.full([32], 1, gl.int32, layout=lanes.type.layout),
                                   mask=lanes == 0, sem="relaxed")
        while w < num_items:
            run, q_start, q_len, first_pos, kv_head = _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs,
                                                               max_q_tiles, BLOCK_Q, SEQ_VEC, HEAVY, SKIP_SINGLE, 1)
            if run:
                it = _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty,
                                   item_smem, w, q_start, q_len, first_pos, kv_head, n, it, GROUP, BLOCK_Q, BLOCK_N,
                                   HEAD_DIM, STAGES, Q_BUFS, DYNAMIC)
                n += 1
            if AHEAD:
                w = gl.max(gl.where(lanes == 0, ticket, -1), 0) + gl.num_programs(0)
                ticket = gl.atomic_add(counter_ptr + lanes * 0, gl.full([32], 1, gl.int32, layout=lanes.type.layout),
                                       mask=lanes == 0, sem="relaxed")
            else:
                w = gl.atomic_add(counter_ptr, 1) + gl.num_programs(0)
        for c in gl.static_range(2):
            buf = (n % Q_BUFS) * 2 + c
            mbarrier.wait(q_empty.index(buf), ((n // Q_BUFS) + 1) & 1, pred=n >= Q_BUFS)
            _put_item(item_smem, buf, -1)
            mbarrier.arrive(q_ready.index(buf))
    elif AHEAD:
        # The static walk, each item's mapping (its loads and divisions) computed one item early, under the loads.
        w = gl.program_id(0)
        run, q_start, q_len, first_pos, kv_head = _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs, max_q_tiles,
                                                           BLOCK_Q, SEQ_VEC, HEAVY, SKIP_SINGLE, 1)
        while w < num_items:
            w_next = w + gl.num_programs(0)
            run_n, q_start_n, q_len_n, first_pos_n, kv_head_n = _ws_item(w_next, num_tiles, query_start_loc_ptr,
                                                                         num_seqs, max_q_tiles, BLOCK_Q, SEQ_VEC,
                                                                         HEAVY, SKIP_SINGLE, 1)
            if run:
                it = _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty,
                                   item_smem, w, q_start, q_len, first_pos, kv_head, n, it, GROUP, BLOCK_Q, BLOCK_N,
                                   HEAD_DIM, STAGES, Q_BUFS, DYNAMIC)
                n += 1
            w = w_next
            run, q_start, q_len, first_pos, kv_head = run_n, q_start_n, q_len_n, first_pos_n, kv_head_n
    else:
        for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
            run, q_start, q_len, first_pos, kv_head = _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs,
                                                               max_q_tiles, BLOCK_Q, SEQ_VEC, HEAVY, SKIP_SINGLE, 1)
            if run:
                it = _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty,
                                   item_smem, w, q_start, q_len, first_pos, kv_head, n, it, GROUP, BLOCK_Q, BLOCK_N,
                                   HEAD_DIM, STAGES, Q_BUFS, DYNAMIC)
                n += 1


@gluon.jit
def _turn_wait(turn, g, C: gl.constexpr, PINGPONG: gl.constexpr):
    """Before this consumer's g-th section of wgmma issues: wait until the other consumer issued its own (consumer 0
    goes first), so one's tensor-core work runs while the other's softmax does (FlashAttention-3's ping-pong,
    by mbarriers: Gluon has no named barriers). Returns g + 1."""
    if PINGPONG:
        if C == 0:
            mbarrier.wait(turn.index(0), (g + 1) & 1, pred=g > 0)
        else:
            mbarrier.wait(turn.index(1), g & 1)
    return g + 1


@gluon.jit
def _turn_arrive(turn, C: gl.constexpr, PINGPONG: gl.constexpr):
    """After this consumer's section of wgmma issues: the other consumer's turn."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - C))


@gluon.jit
def _ws_work(out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_empty, ready, empty, turn, buf, it, g, q_start,
             q_len, first_pos, kv_head, qk_scale, stride_ot, stride_oh, C: gl.constexpr, GROUP: gl.constexpr,
             BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
             MASK_BRANCH: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, TMA_STORE: gl.constexpr):
    """Consumer C, one work item whose q is in buffer buf (its q_ready waited for) and whose key tiles start at ring
    tile `it`: attend, release each ring slot once its PV wgmma is done and q's buffer after the last QK^T, store.
    TMA_STORE: a whole item's output leaves through out_smem and o_desc. Returns (it, g) after the item."""
    TQ: gl.constexpr = BLOCK_Q // 2
    ROWS: gl.constexpr = TQ * GROUP
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    r_s = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    r_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    n_tiles = gl.cdiv(gl.minimum(first_pos + BLOCK_Q, q_len), BLOCK_N)
    q_pos = first_pos + C * TQ + r_s % TQ
    q = q_smem.index(buf)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    if OVERLAP == 2:
        slot0 = it % STAGES
        mbarrier.wait(ready.index(slot0), (it // STAGES) & 1)
        g = _turn_wait(turn, g, C, PINGPONG)
        s = warpgroup_mma(q, k_smem.index(slot0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _turn_arrive(turn, C, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, 0, q_pos, first_pos, qk_scale, s_layout,
                                           o_layout, BLOCK_N, MASK_BRANCH)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_tiles):
            cur = (it + j) % STAGES
            prev = (it + j - 1) % STAGES
            mbarrier.wait(ready.index(cur), ((it + j) // STAGES) & 1)
            g = _turn_wait(turn, g, C, PINGPONG)
            s = warpgroup_mma(q, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            _turn_arrive(turn, C, PINGPONG)
            s = warpgroup_mma_wait(1, deps=(s,))  # QK^T(j) is done; PV(j - 1) may still run
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, j, q_pos, first_pos, qk_scale, s_layout,
                                               o_layout, BLOCK_N, MASK_BRANCH)
            # p_op (PV(j - 1)'s A operand, read from registers) stays alive until that wgmma is done.
            acc, p_old = warpgroup_mma_wait(0, deps=(acc, p_op))
            mbarrier.arrive(empty.index(prev))
            acc = acc * alpha[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.arrive(q_empty.index(buf))  # every QK^T of the item is done: q's buffer may be refilled
        last = (it + n_tiles - 1) % STAGES
        g = _turn_wait(turn, g, C, PINGPONG)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        _turn_arrive(turn, C, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(last))
    elif OVERLAP:
        mbarrier.wait(ready.index(it % STAGES), (it // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(it % STAGES).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        for j in range(n_tiles - 1):
            cur = (it + j) % STAGES
            nxt = (it + j + 1) % STAGES
            mbarrier.wait(ready.index(nxt), ((it + j + 1) // STAGES) & 1)
            s_next = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, j, q_pos, first_pos, qk_scale, s_layout,
                                               o_layout, BLOCK_N, MASK_BRANCH)
            acc = acc * alpha[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc,
                                is_async=True)
            # Both in flight are waited for here (ptxas serializes a loop whose wgmma crosses its back edge).
            acc, s = warpgroup_mma_wait(0, deps=(acc, s_next))
            mbarrier.arrive(empty.index(cur))
        last = n_tiles - 1
        mbarrier.arrive(q_empty.index(buf))  # every QK^T of the item is done: q's buffer may be refilled
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, last, q_pos, first_pos, qk_scale, s_layout,
                                           o_layout, BLOCK_N, MASK_BRANCH)
        acc = acc * alpha[:, None]
        cur = (it + last) % STAGES
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(cur))
    else:
        for j in range(n_tiles):
            cur = (it + j) % STAGES
            mbarrier.wait(ready.index(cur), ((it + j) // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, acc, j, q_pos, first_pos, qk_scale, s_layout,
                                               o_layout, BLOCK_N, MASK_BRANCH)
            acc = acc * alpha[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index(cur))
        mbarrier.arrive(q_empty.index(buf))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    if TMA_STORE:
        if first_pos + BLOCK_Q <= q_len:  # every row of the item is the sequence's (a TMA box has no row mask)
            _ws_store_tma(o_desc, out_smem.index(C), out.to(dtype), q_start + first_pos + C * TQ, kv_head, GROUP,
                          TQ, HEAD_DIM)
        else:
            _ws_store(out_ptr, out.to(dtype), q_start, q_len, first_pos, kv_head, stride_ot, stride_oh, r_o, o_d, C,
                      GROUP, TQ)
    else:
        _ws_store(out_ptr, out.to(dtype), q_start, q_len, first_pos, kv_head, stride_ot, stride_oh, r_o, o_d, C,
                  GROUP, TQ)
    return it + n_tiles, g


@gluon.jit
def _ws_store(out_ptr, out, q_start, q_len, first_pos, kv_head, stride_ot, stride_oh, r_o, o_d, C: gl.constexpr,
              GROUP: gl.constexpr, TQ: gl.constexpr):
    """Consumer C's rows of the item's output, from registers (rows past the sequence's end masked)."""
    o_idx = first_pos + C * TQ + r_o % TQ
    o_off = (q_start + o_idx).to(gl.int64) * stride_ot + (kv_head * GROUP + r_o // TQ) * stride_oh
    gl.store(out_ptr + o_off[:, None] + o_d[None, :], out, mask=(o_idx < q_len)[:, None])


@gluon.jit
def _ws_store_tma(o_desc, o_smem, out, row0, kv_head, GROUP: gl.constexpr, TQ: gl.constexpr, HEAD_DIM: gl.constexpr):
    """TMA_STORE: consumer C's rows through its staging buffer, one TMA box per head (as q came in), left in
    flight: the buffer is reused only after this consumer's previous stores have read it."""
    tma.store_wait(0)  # the issuing thread's earlier stores have read the buffer ...
    gl.thread_barrier()  # ... before any thread overwrites it
    o_smem.store(out)
    fence_async_shared()  # the writes are visible to the TMA unit ...
    gl.thread_barrier()  # ... from every thread, before the store is issued
    for h in gl.static_range(GROUP):
        tma.async_copy_shared_to_global(o_desc, [row0, (kv_head * GROUP + h) * HEAD_DIM], o_smem.slice(h * TQ, TQ))


@gluon.jit
def _ws_consumer(out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn, item_smem,
                 query_start_loc_ptr, num_seqs, max_q_tiles, num_tiles, num_items, qk_scale, stride_ot, stride_oh,
                 C: gl.constexpr, GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, SEQ_VEC: gl.constexpr, HEAVY: gl.constexpr,
                 SKIP_SINGLE: gl.constexpr, MASK_BRANCH: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                 Q_BUFS: gl.constexpr, DYNAMIC: gl.constexpr, TMA_STORE: gl.constexpr, AHEAD: gl.constexpr):
    """Half C of each work item's rows (TQ tokens x GROUP heads, head-major), item after item in the producer's
    order (with DYNAMIC the producer names each item beside its q; -1 ends). OVERLAP 1: the next tile's QK^T is
    issued before this tile's softmax; 2: FlashAttention-3's order, QK^T(j) and PV(j - 1) issued together, then
    tile j's softmax while PV(j - 1) runs, with PINGPONG the two consumers' issues alternating."""
    n = 0
    it = 0
    g = 0  # sections of wgmma issues so far (PINGPONG's turn phases)
    if DYNAMIC:
        mbarrier.wait(q_ready.index(C), 0)
        w = _get_item(item_smem, C)
        while w >= 0:
            run, q_start, q_len, first_pos, kv_head = _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs,
                                                               max_q_tiles, BLOCK_Q, SEQ_VEC, HEAVY, SKIP_SINGLE, 4)
            it, g = _ws_work(out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_empty, ready, empty, turn,
                             (n % Q_BUFS) * 2 + C, it, g, q_start, q_len, first_pos, kv_head, qk_scale, stride_ot,
                             stride_oh, C, GROUP, BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES, MASK_BRANCH, OVERLAP, PINGPONG,
                             TMA_STORE)
            n += 1
            buf = (n % Q_BUFS) * 2 + C
            mbarrier.wait(q_ready.index(buf), (n // Q_BUFS) & 1)
            w = _get_item(item_smem, buf)
    elif AHEAD:
        # The static walk, each item's mapping computed one item early (its loads in flight under this item's work).
        w = gl.program_id(0)
        run, q_start, q_len, first_pos, kv_head = _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs, max_q_tiles,
                                                           BLOCK_Q, SEQ_VEC, HEAVY, SKIP_SINGLE, 4)
        while w < num_items:
            w_next = w + gl.num_programs(0)
            run_n, q_start_n, q_len_n, first_pos_n, kv_head_n = _ws_item(w_next, num_tiles, query_start_loc_ptr,
                                                                         num_seqs, max_q_tiles, BLOCK_Q, SEQ_VEC,
                                                                         HEAVY, SKIP_SINGLE, 4)
            if run:
                buf = (n % Q_BUFS) * 2 + C
                mbarrier.wait(q_ready.index(buf), (n // Q_BUFS) & 1)
                it, g = _ws_work(out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_empty, ready, empty, turn, buf,
                                 it, g, q_start, q_len, first_pos, kv_head, qk_scale, stride_ot, stride_oh, C, GROUP,
                                 BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES, MASK_BRANCH, OVERLAP, PINGPONG,
                                 TMA_STORE)
                n += 1
            w = w_next
            run, q_start, q_len, first_pos, kv_head = run_n, q_start_n, q_len_n, first_pos_n, kv_head_n
    else:
        for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
            run, q_start, q_len, first_pos, kv_head = _ws_item(w, num_tiles, query_start_loc_ptr, num_seqs,
                                                               max_q_tiles, BLOCK_Q, SEQ_VEC, HEAVY, SKIP_SINGLE, 4)
            if run:
                buf = (n % Q_BUFS) * 2 + C
                mbarrier.wait(q_ready.index(buf), (n // Q_BUFS) & 1)
                it, g = _ws_work(out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_empty, ready, empty, turn, buf,
                                 it, g, q_start, q_len, first_pos, kv_head, qk_scale, stride_ot, stride_oh, C, GROUP,
                                 BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES, MASK_BRANCH, OVERLAP, PINGPONG,
                                 TMA_STORE)
                n += 1
    if TMA_STORE:
        tma.store_wait(0)  # the staging buffer stays the program's until its last store has read it


@gluon.jit(do_not_specialize=["num_seqs", "max_q_tiles", "num_tiles", "num_items"])
def _prefill_ws_kernel(q_desc, k_desc, v_desc, o_desc, query_start_loc_ptr, out_ptr, counter_ptr, qk_scale,
                       stride_ot, stride_oh, num_seqs, max_q_tiles, num_tiles, num_items,
                       GROUP: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       STAGES: gl.constexpr, SEQ_VEC: gl.constexpr, HEAVY: gl.constexpr, SKIP_SINGLE: gl.constexpr,
                       MASK_BRANCH: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                       Q_BUFS: gl.constexpr, DYNAMIC: gl.constexpr, AHEAD: gl.constexpr, TMA_STORE: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr,
                       num_warps: gl.constexpr):
    """Work items w = tile slot + num_tiles * kv head, from program_id(0) in steps of the grid (one item per
    program without PERSISTENT): BLOCK_Q tokens x the GROUP heads of one KV head, split into roles (above)."""
    dtype: gl.constexpr = k_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2 * Q_BUFS, BLOCK_Q // 2 * GROUP, HEAD_DIM], q_desc.layout)  # buffer x half
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    # TMA_STORE: one output staging buffer per consumer (else a placeholder of one row, never used)
    out_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_Q // 2 * GROUP if TMA_STORE else 8, HEAD_DIM],
                                         o_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2 * Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2 * Q_BUFS, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2 * Q_BUFS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    item_smem = gl.allocate_shared_memory(gl.int32, [2 * Q_BUFS, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    fence_async_shared()  # the barriers' initialization is visible to the TMA unit before it signals them
    gl.warp_specialize([
        (_ws_consumer, (out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn,
                        item_smem,
                        query_start_loc_ptr, num_seqs, max_q_tiles, num_tiles, num_items, qk_scale, stride_ot,
                        stride_oh, 0, GROUP, BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES, SEQ_VEC, HEAVY, SKIP_SINGLE,
                        MASK_BRANCH, OVERLAP, PINGPONG, Q_BUFS, DYNAMIC, TMA_STORE,
                        AHEAD)),
        (_ws_consumer, (out_ptr, o_desc, out_smem, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn,
                        item_smem,
                        query_start_loc_ptr, num_seqs, max_q_tiles, num_tiles, num_items, qk_scale, stride_ot,
                        stride_oh, 1, GROUP, BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES, SEQ_VEC, HEAVY, SKIP_SINGLE,
                        MASK_BRANCH, OVERLAP, PINGPONG, Q_BUFS, DYNAMIC, TMA_STORE,
                        AHEAD)),
        (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, item_smem,
                        counter_ptr, query_start_loc_ptr, num_seqs, max_q_tiles, num_tiles, num_items, GROUP, BLOCK_Q,
                        BLOCK_N, HEAD_DIM, STAGES, SEQ_VEC, HEAVY, SKIP_SINGLE, Q_BUFS, DYNAMIC, AHEAD)),
    ], [4, 1], [CONSUMER_REGS, 24])
    for i in gl.static_range(2 * Q_BUFS):
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))


def supported_ws(q: torch.Tensor) -> bool:
    """The warp-specialized kernel's own condition (beyond supported()): q read by TMA, [tokens, heads x head_dim]."""
    return q.stride(1) == q.shape[2] and q.stride(0) * q.element_size() % 16 == 0 and q.data_ptr() % 16 == 0


def prefill_fresh_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: torch.Tensor,
                     scale: float, out: torch.Tensor, cfg: dict, skip_single: bool = False,
                     max_q_tiles: int = 0) -> torch.Tensor:
    """prefill_fresh with the warp-specialized kernel: 128 rows per work item (two 64-row consumer warpgroups).
    cfg: BLOCK_N, num_stages (the K/V ring, >= 2), SEQ_VEC, ONE_LOOP (2: the causal compare by a runtime branch),
    OVERLAP_QK (1: the next QK^T under the softmax; 2: FlashAttention-3's order, the softmax under the previous
    PV), PINGPONG (with OVERLAP_QK 2: the consumers' wgmma issues alternate), WS_REGS (the consumers' registers;
    the producer keeps 24),
    PERSISTENT (1: one program per SM walking the items; with DYNAMIC each takes the next untaken item from a global
    counter rather than every num_programs-th: the heaviest left goes to whichever program is free), Q_BUFS (q buffers per consumer, default 2: the next
    item's q loads while this one's first tile runs; 1 frees 32 KB for a deeper K/V ring), AHEAD (with PERSISTENT:
    DYNAMIC's producer takes the next item's ticket before this item's loads, reading it after them; the static walk's
    producer and consumers compute the next item's mapping one item early), TMA_STORE (a whole item's output through
    a staging buffer per consumer and TMA, where out allows it; 32 KB of shared memory). max_q_tiles > 0:
    HEAVY_FIRST's mapping."""
    if cfg["num_stages"] < 2:
        raise ValueError(f"the Gluon prefill kernel's ring needs num_stages >= 2; got {cfg['num_stages']}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = query_start_loc.shape[0] - 1
    block_n = cfg["BLOCK_N"]
    block_q = 128 // group
    layout = _smem_layout(block_n, head_dim, q.dtype == torch.bfloat16)
    k_desc, v_desc = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                                       [block_n, head_dim], layout) for t in (k, v))
    q_desc = TensorDescriptor(q, [num_tokens, num_heads * head_dim], [q.stride(0), 1], [block_q // 2, head_dim],
                              _smem_layout(block_q // 2, head_dim, q.dtype == torch.bfloat16))
    tma_store = bool(cfg.get("TMA_STORE")) and out.stride(1) == head_dim and out.stride(2) == 1 and \
        out.stride(0) * out.element_size() % 16 == 0 and out.data_ptr() % 16 == 0
    o_desc = TensorDescriptor(out, [out.shape[0], num_heads * head_dim], [out.stride(0), 1], [block_q // 2, head_dim],
                              _smem_layout(block_q // 2, head_dim, q.dtype == torch.bfloat16)) if tma_store else q_desc
    seq_vec = cfg["SEQ_VEC"] if num_seqs < cfg["SEQ_VEC"] and not max_q_tiles else 0  # HEAVY: no search
    num_tiles = num_seqs * max_q_tiles if max_q_tiles else num_tokens // block_q + num_seqs
    num_items = num_tiles * num_kv_heads
    programs = min(num_items, sm_count(q.device)) if cfg.get("PERSISTENT") else num_items
    dynamic = bool(cfg.get("PERSISTENT") and cfg.get("DYNAMIC"))
    # DYNAMIC: the next item's index, counted from 0 by each launch (a memset; programs start at their own id)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device) if dynamic else query_start_loc
    _prefill_ws_kernel[(programs,)](
        q_desc, k_desc, v_desc, o_desc, query_start_loc, out, counter, scale * 1.4426950408889634,
        out.stride(0), out.stride(1), num_seqs, max_q_tiles, num_tiles, num_items,
        GROUP=group, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=cfg["num_stages"], SEQ_VEC=seq_vec,
        HEAVY=max_q_tiles > 0, SKIP_SINGLE=bool(skip_single), MASK_BRANCH=cfg.get("ONE_LOOP") == 2,
        OVERLAP=int(cfg.get("OVERLAP_QK") or 0), PINGPONG=bool(cfg.get("PINGPONG")), Q_BUFS=int(cfg.get("Q_BUFS") or 2),
        DYNAMIC=dynamic, AHEAD=bool(cfg.get("PERSISTENT") and cfg.get("AHEAD")), TMA_STORE=tma_store,
        CONSUMER_REGS=int(cfg.get("WS_REGS") or 240), num_warps=4)
    return out
