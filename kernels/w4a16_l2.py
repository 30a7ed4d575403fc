"""L2 prefetch of a W4A16 projection's weights, meant to run on a side stream while the main stream runs the small
dependent kernels before that projection (norm, rotary, attention, its split reduce).

Why: at batch 1 the small GEMVs (the 8B's qkv, 12.6 MB, and o, 8.4 MB) run at 1.7-2.0 TB/s, far under the copy
rate, because each pays its own ramp and tail; between them the step runs ~13 us per layer of kernels that leave
HBM idle. This kernel asks L2 (H200: ~50-60 MB) for every 128-byte line of the given buffers, one
`prefetch.global.L2` per line (a hint: no register holds the data, nothing is written), so that the GEMV later
reads them from L2. Session 6's prefetches ran inside the GEMVs (in-stream, before their PDL wait) and lost; here
they run in another stream, on the SMs those small kernels leave free, and hold nothing on the main stream.
`EVICT_LAST` marks the lines L2::evict_last (a streaming GEMV in between then evicts other lines first).

Three (buffer, bytes) pairs per launch (the qweight, scales and zeros of one projection); each program takes
LINES consecutive lines of one buffer. The first buffer may be read in part (`head`): the first `head` rows of
every run of `per` rows, i.e. the tiles a split-K `gemv3` grid reads first in each of its K slices (its programs
all start together, so those are what its first wave waits for). Not in the interpreter (inline PTX): CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LINE = 128
LINES = 1024
"""128-byte lines per program (128 KB): 4 warps, 8 prefetches per thread."""


@triton.jit
def _prefetch_lines(ptrs, EVICT_LAST: tl.constexpr):
    if EVICT_LAST:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(a_ptr, a_lines, a_chunk, a_stride, a_total, b_ptr, b_lines, c_ptr, c_lines, a_progs, b_progs,
                        LINES: tl.constexpr, EVICT_LAST: tl.constexpr):
    """a: a_lines lines counted over chunks of a_chunk lines that start every a_stride lines (never past its
    a_total lines); b, c: contiguous."""
    pid = tl.program_id(0)
    offs = tl.arange(0, LINES)
    if pid < a_progs:
        v = tl.minimum(pid * LINES + offs, a_lines - 1)
        a_line = tl.minimum((v // a_chunk).to(tl.int64) * a_stride + v % a_chunk, a_total - 1)
        _prefetch_lines(a_ptr + a_line * 128, EVICT_LAST)
    elif pid < a_progs + b_progs:
        b_line = tl.minimum((pid - a_progs) * LINES + offs, b_lines - 1).to(tl.int64)
        _prefetch_lines(b_ptr + b_line * 128, EVICT_LAST)
    else:
        c_line = tl.minimum((pid - a_progs - b_progs) * LINES + offs, c_lines - 1).to(tl.int64)
        _prefetch_lines(c_ptr + c_line * 128, EVICT_LAST)


def _bytes(t: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """A contiguous tensor as bytes and its 128-byte line count (an empty stand-in for None)."""
    if t is None or t.numel() == 0:
        return None, 0
    return t.view(-1).view(torch.uint8), -(-t.numel() * t.element_size() // LINE)


def head_lines(t: torch.Tensor, per: int, head: int) -> tuple[int, int, int]:
    """(lines, chunk, stride) of the first `head` rows of every `per` rows of a contiguous 2-D tensor."""
    row = t.shape[1] * t.element_size()
    chunk, stride = max(1, head * row // LINE), max(1, per * row // LINE)
    chunks = -(-t.shape[0] // per)
    return chunks * chunk, chunk, stride


def prefetch(tensors: list[torch.Tensor | None], evict_last: bool = False, head: tuple[int, int] | None = None) -> None:
    """Launch one prefetch of up to three contiguous CUDA tensors' bytes into L2 on the current stream; `head`
    (per, rows): of the first tensor (2-D) only the first `rows` rows of every `per`."""
    parts = [_bytes(t) for t in (list(tensors) + [None, None, None])[:3]]
    first = next((p for p, n in parts if n), None)
    if first is None:
        return
    parts = [(p if n else first, n) for p, n in parts]
    (a, na), (b, nb), (c, nc) = parts
    total = chunk = max(na, 1)
    stride = 0
    if head is not None and na and head[1] < head[0]:
        na, chunk, stride = head_lines(tensors[0], *head)
    progs = [-(-n // LINES) for n in (na, nb, nc)]
    _l2_prefetch_kernel[(sum(progs),)](a, max(na, 1), chunk, stride, total, b, max(nb, 1), c, max(nc, 1), progs[0], progs[1],
                                       LINES=LINES, EVICT_LAST=evict_last, num_warps=4, num_stages=1)
