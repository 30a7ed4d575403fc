"""Fused mixture-of-experts: every token's top-k experts as two grouped GEMM launches (gate/up with the gated
activation fused, then down with the routing weight), plus the token-to-expert alignment and a torch reference.

Algorithm. Each token t picks k experts (topk_ids [T, k]); the pair (t, j) is "slot" s = t * k + j. `moe_align`
sorts the T*k slots by expert and pads each expert's run to a multiple of BLOCK_M with a sentinel slot T*k, so
each BLOCK_M-row block of `sorted_ids` belongs to one expert (`expert_ids[block]`). A kernel program takes one
row block and one BLOCK_N column block, gathers its rows of the input, multiplies by that expert's weight and
scatters the result to the slots' rows of the output [T*k, N]. The final sum over k is a reshape and sum.

Everything has a shape fixed by (T, k, E, BLOCK_M) and runs on the device without a host sync (no
`.item()`, no data-dependent sizes): the number of row blocks is an upper bound, and programs past the
padded total (read from device memory) return at once. So a decode step is CUDA-graph capturable.

Weights are stored like linear layers' ([out, in] per expert): w13 [E, 2 * I, H] is gate rows then up rows,
w2 [E, H, I]. Activations: "silu" (SwiGLU: silu(gate) * up) and "swiglu_oai" (gpt-oss: gate clamped to
<= limit, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 1, "swiglu_oai": 2}


@triton.jit
def _fused_moe_kernel(
    a_ptr,  # [rows_a, K]: the hidden states (row = slot // top_k) or the activated intermediates (row = slot)
    w_ptr,  # [E, N_w, K]: per-expert weight, out x in; with ACT, gate rows [0, N) then up rows [N, 2N)
    bias_ptr,  # [E, N_w] (read if HAS_BIAS)
    c_ptr,  # [T * k, N]: one output row per slot
    weights_ptr,  # fp32 [T * k]: routing weight per slot (read if MUL_WEIGHT)
    sorted_ids_ptr,  # int32 [max_padded]: slots grouped by expert; padding = num_slots
    expert_ids_ptr,  # int32 [max_padded // BLOCK_M]: the expert of each row block
    num_padded_ptr,  # int32 [1]: rows of sorted_ids in use (a multiple of BLOCK_M)
    N, K, num_slots, top_k,
    stride_am, stride_we, stride_wn, stride_be, stride_cm,
    alpha, limit,
    ACT: tl.constexpr,  # 0: none; 1: silu(gate) * up; 2: gpt-oss clamped SwiGLU
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    GATHER_BY_TOPK: tl.constexpr,  # rows of a are tokens (slot // top_k), not slots
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Row blocks vary fastest: the programs running together read the same weight columns, so an expert
    # whose tokens span several row blocks has its weight tile fetched from HBM once and hit in L2 after.
    pid = tl.program_id(0)
    num_m = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    pid_m = pid % num_m
    pid_n = pid // num_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m)
    row_ok = slots < num_slots
    rows = (slots // top_k) if GATHER_BY_TOPK else slots
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    w_base = w_ptr + expert * stride_we
    w_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT != 0:
        up_ptrs = w_ptrs + N * stride_wn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if ACT != 0:
            wu = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up = tl.dot(a, wu, acc_up, input_precision=DOT_PRECISION)
            up_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        b_base = bias_ptr + expert * stride_be
        acc += tl.load(b_base + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:
            acc_up += tl.load(b_base + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    elif ACT == 2:
        g = tl.minimum(acc, limit)
        u = tl.minimum(tl.maximum(acc_up, -limit), limit)
        acc = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + slots, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """topk_ids [T, k] -> (sorted_ids int32 [max_padded], expert_ids int32 [max_padded // block_m],
    num_padded int32 [1]). Slots of expert e occupy rows [start_e, start_e + count_e) of sorted_ids, in
    slot order; start_e is the padded count of the experts before it. All on the device, fixed shapes."""
    flat = topk_ids.reshape(-1).long()
    n, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices
    expert_sorted = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_sorted]
    dest = (ends - padded)[expert_sorted] + rank
    # At most min(E, n) experts are hit, each wasting at most block_m - 1 rows of padding.
    max_padded = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def default_config(num_slots: int, num_experts: int) -> dict:
    """Tile sizes by the expected rows per expert: small tiles at decode (weights are read once either way;
    more programs keep the memory system busy), 64-row tiles once each expert has that many rows."""
    per_expert = num_slots / num_experts
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _launch(a, w, bias, out, weights, align, top_k, act: int, gather: bool, cfg: dict, alpha: float, limit: float):
    sorted_ids, expert_ids, num_padded = align
    n_out = out.shape[1]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (expert_ids.numel() * triton.cdiv(n_out, bn),)
    fp32 = a.dtype == torch.float32
    # The tiles are sized for 2-byte operands; float32 halves BLOCK_K so the pipelined tiles of A and of
    # the gate and up weights still fit in shared memory (64x128x64 at 3 stages needs 240 KiB in fp32).
    bk = max(16, cfg["BLOCK_K"] // 2) if fp32 else cfg["BLOCK_K"]
    _fused_moe_kernel[grid](
        a, w, bias if bias is not None else w, out, weights if weights is not None else a,
        sorted_ids, expert_ids, num_padded,
        n_out, a.shape[1], out.shape[0], top_k,
        a.stride(0), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0, out.stride(0),
        alpha, limit,
        ACT=act, HAS_BIAS=bias is not None, MUL_WEIGHT=weights is not None, GATHER_BY_TOPK=gather,
        DOT_PRECISION="ieee" if fp32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", w13_bias: torch.Tensor | None = None,
              alpha: float = 1.702, limit: float = 7.0, config: dict | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] (float32), topk_ids [T, k] ->
    sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])  [T, H] in x's dtype (the down projection's bias,
    if any, is the caller's: under tensor parallelism it must be added once, after the all-reduce)."""
    T, H = x.shape
    E, two_i, h_w = w13.shape
    k = topk_ids.shape[1]
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")
    if h_w != H or two_i % 2 or tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"expert weights must be w13 [E, 2I, H={H}] and w2 [E, H, I]; got {tuple(w13.shape)} "
                         f"and {tuple(w2.shape)}")
    if tuple(topk_weights.shape) != (T, k) or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_weights must be [T={T}, k={k}] and topk_ids integer; got "
                         f"{tuple(topk_weights.shape)}, {topk_ids.dtype}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1 or t.dtype != x.dtype:
            raise ValueError(f"{name} must have a contiguous last dimension and x's dtype {x.dtype}")
    inter = two_i // 2
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cfg = config or default_config(T * k, E)
    align = moe_align(topk_ids, E, cfg["BLOCK_M"])
    mid = torch.empty((T * k, inter), dtype=x.dtype, device=x.device)
    _launch(x, w13, w13_bias, mid, None, align, k, ACTIVATIONS[activation], True, cfg, alpha, limit)
    down = torch.empty((T * k, H), dtype=x.dtype, device=x.device)
    _launch(mid, w2, None, down, topk_weights.reshape(-1).float().contiguous(), align, k, 0, False, cfg,
            alpha, limit)
    return torch.sum(down.view(T, k, H), dim=1, out=out)


def apply_activation(gate_up: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0):
    """[..., 2I] (gate half, then up half) -> [..., I], as the kernel's fused epilogue computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "swiglu_oai":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")


def fused_moe_ref(x, w13, w2, topk_weights, topk_ids, activation: str = "silu", w13_bias=None,
                  alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The same as `fused_moe` in plain torch, one expert at a time over the tokens routed to it."""
    T, H = x.shape
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    down = torch.zeros((T * k, H), dtype=torch.float32, device=x.device)
    for e in flat.unique().tolist():
        slots = (flat == e).nonzero().squeeze(1)
        gu = x[slots // k] @ w13[e].t()
        if w13_bias is not None:
            gu = gu + w13_bias[e]
        mid = apply_activation(gu.float(), activation, alpha, limit).to(x.dtype)
        down[slots] = (mid @ w2[e].t()).float() * topk_weights.reshape(-1)[slots, None].float()
    return down.view(T, k, H).sum(1).to(x.dtype)
