"""Split-K in one launch for the weight-only GEMMs (kernels/w4a16.py, kernels/fp8_gemv.py): the K-slices of an
output tile add their float32 partial sums into a shared workspace, and the slice that finishes last writes
the tile in the output dtype and leaves the workspace and its tile counter at zero for the next call.

Decode multiplies a handful of rows by a wide matrix: without split-K the N tiles alone leave most SMs idle,
and a second kernel to sum the partials costs a launch per layer. The workspace is one per device, sized at
load (`reserve`) so that CUDA graphs captured later keep pointing at it; GEMMs on one stream run one at a
time, so they can share it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_os, ws_ptr, cnt_ptr, tile, split_k,
                 SPLIT: tl.constexpr, ATOMIC: tl.constexpr):
    """Write this program's [BLOCK_M, BLOCK_N] float32 `acc` for output tile `tile`.

    Not SPLIT (split_k == 1): straight to out. ATOMIC: through the workspace ws [M, N] float32 (zero on entry) and
    cnt [tiles] int32; the last of the split_k programs of the tile reads the sums back (an atomic add of zero, so it
    reads what the others added at L2), writes out and zeroes the workspace and counter. Otherwise out is a
    [split_k, M, N] float32 buffer of partials the caller sums."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if not SPLIT:
        tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif ATOMIC:
        ws = ws_ptr + rows * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the release below publishes them
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == split_k - 1:
            total = tl.atomic_add(ws, tl.zeros_like(acc), mask=mask, sem="relaxed")  # read at L2, not L1
            tl.store(out_ptr + rows * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(ws, tl.zeros_like(acc), mask=mask)
            tl.store(cnt_ptr + tile, 0)
    else:
        ptrs = out_ptr + tl.program_id(1) * stride_os + rows * stride_om + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []
"""Replaced workspaces stay alive: a CUDA graph captured before a resize still points at them."""


def reserve(device: torch.device, elements: int) -> None:
    """Make the device's workspace hold at least `elements` float32 sums (and as many tile counters).
    Called at load for every layer, before any graph is captured."""
    device = torch.device(device)
    have = _WORKSPACES.get(device)
    if have is not None and have[0].numel() >= elements:
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"split-K workspace on {device} needs {elements} floats, holds "
                           f"{0 if have is None else have[0].numel()}: reserve it at load, before CUDA graph capture")
    if have is not None:
        _RETIRED.append(have)
    n = max(elements, 1 << 16)
    _WORKSPACES[device] = (torch.zeros(n, dtype=torch.float32, device=device),
                           torch.zeros(n, dtype=torch.int32, device=device))


def workspace(device: torch.device, elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's (sums, counters), grown to `elements` first when outside a capture."""
    reserve(device, elements)
    return _WORKSPACES[torch.device(device)]


def outputs(x: torch.Tensor, m: int, n: int, split: int, atomic: bool):
    """(out, ws, cnt) for a GEMM of x [m, K] into [m, n] in `split` K-slices: out in x's dtype, through the
    device's workspace when `atomic` (splitk_store's ATOMIC); else [split, m, n] float32 partials that
    `finish` sums. ws and cnt are out itself where no workspace is needed (unsplit, not atomic, or m == 0)."""
    if split == 1 or atomic:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    ws, cnt = workspace(x.device, m * n) if split > 1 and atomic and m > 0 else (out, out)
    return out, ws, cnt


def finish(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The GEMM's result from `outputs`' buffer: itself, or its partials summed in `dtype`."""
    return out if out.dim() == 2 else out.sum(0).to(dtype)


def split_for(tiles: int, blocks: int, sms: int, per_sm: int = 2, max_split: int = 16, min_blocks: int = 2) -> int:
    """How many K-slices (a power of two) give about `per_sm` programs per SM, each slice keeping at least
    `min_blocks` K-blocks."""
    split = 1
    while split < max_split and tiles * split < per_sm * sms and blocks // (split * 2) >= min_blocks:
        split *= 2
    return split


def sm_count(device: torch.device) -> int:
    """The device's SMs (4 stands in on CPU, so the interpreter tests exercise split-K)."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = ["splitk_store", "reserve", "workspace", "outputs", "finish", "split_for", "sm_count"]
