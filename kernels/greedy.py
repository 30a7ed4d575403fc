"""Greedy sampling in one pass over the logits: each row's argmax (the first index of the maximum, as
torch.argmax) and its log-probability under the row's softmax, -log(sum(exp(x - max))).

What the sampler runs for an all-greedy step with nothing to adjust and no logprobs asked (the steady
state of most serving and benchmark traffic) instead of log_softmax + argmax + gather: one read of the
[N, V] logits where those three read and write them several times (~0.2 ms a step at 256 x 128,256 on an
H200, bench/decode_profile.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_kernel(logits_ptr, token_ptr, logprob_ptr, part_m_ptr, part_s_ptr, part_arg_ptr, stride_row, vocab,
                   chunk_len, num_chunks, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Program (row, c): the row's chunk c, [c * chunk_len, (c + 1) * chunk_len). Not SPLIT (one chunk): the
    row's token and logprob; else the chunk's max, sum of exp(x - max) and first argmax, for _combine_kernel."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.zeros([], tl.float32)  # running sum of exp(x - m)
    best = tl.zeros([], tl.int32)
    lo = c * chunk_len
    hi = tl.minimum(lo + chunk_len, vocab)
    for start in range(lo, hi, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < hi, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        block_arg = tl.argmax(x, 0, tie_break_left=True)
        new_m = tl.maximum(m, block_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
        best = tl.where(block_max > m, block_arg + start, best)  # strictly greater: the first maximum stays
        m = new_m
    if SPLIT:
        part = row * num_chunks + c
        tl.store(part_m_ptr + part, m)
        tl.store(part_s_ptr + part, s)
        tl.store(part_arg_ptr + part, best)
    else:
        tl.store(token_ptr + row, best.to(tl.int64))
        tl.store(logprob_ptr + row, -tl.log(s))


@triton.jit
def _combine_kernel(token_ptr, logprob_ptr, part_m_ptr, part_s_ptr, part_arg_ptr, num_chunks,
                    CHUNKS: tl.constexpr):
    """One row from its chunks' partials: the first chunk holding the maximum gives the token (so the first
    index of the maximum wins, as in torch.argmax), the sums rescaled to the maximum give the logprob."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS)
    ok = offs < num_chunks
    part = row * num_chunks + offs
    m = tl.load(part_m_ptr + part, mask=ok, other=float("-inf"))
    s = tl.load(part_s_ptr + part, mask=ok, other=0.0)
    arg = tl.load(part_arg_ptr + part, mask=ok, other=0)
    top = tl.max(m, 0)
    first = tl.min(tl.where(m == top, offs, CHUNKS), 0)
    token = tl.sum(tl.where(offs == first, arg, 0), 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, -tl.log(total))


BLOCKS_PER_CHUNK = 4
"""A program reads at most this many BLOCK-wide tiles of a row: a row of a 128k vocabulary is 32 tiles, and one
program walking all of them in series (one load in flight at a time) left the device at ~1.3-1.9 TB/s with 256
to 1,024 rows (bench/small_profile.py, round 1: 0.052 ms at 256 x 128,256, 0.136 ms at 1,024)."""


def greedy_sample(logits: torch.Tensor, blocks_per_chunk: int = BLOCKS_PER_CHUNK,
                  block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (any float dtype, last dim contiguous) -> (tokens [N] int64, logprobs [N] float32).
    Each row is read in chunks of `blocks_per_chunk` tiles of `block` columns by programs of their own, whose
    partials a second kernel combines (one kernel when a row is one chunk)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [N, V] tensor with a contiguous last dim; got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    n, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: the vocabulary dimension is empty")
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    if not n:
        return tokens, logprobs
    block = min(block, triton.next_power_of_2(vocab))
    chunk_len = block * blocks_per_chunk
    chunks = triton.cdiv(vocab, chunk_len)
    if chunks == 1:
        _greedy_kernel[(n, 1)](logits, tokens, logprobs, tokens, tokens, tokens, logits.stride(0), vocab, chunk_len, 1,
                               BLOCK=block, SPLIT=False, num_warps=8)
        return tokens, logprobs
    part_m = torch.empty(n, chunks, dtype=torch.float32, device=logits.device)
    part_s = torch.empty_like(part_m)
    part_arg = torch.empty(n, chunks, dtype=torch.int32, device=logits.device)
    _greedy_kernel[(n, chunks)](logits, tokens, logprobs, part_m, part_s, part_arg, logits.stride(0), vocab, chunk_len,
                                chunks, BLOCK=block, SPLIT=True, num_warps=8)
    _combine_kernel[(n,)](tokens, logprobs, part_m, part_s, part_arg, chunks,
                          CHUNKS=max(2, triton.next_power_of_2(chunks)), num_warps=1)
    return tokens, logprobs


def greedy_sample_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops it replaces, in float64 for the log-probability."""
    x = logits.double()
    tokens = x.argmax(dim=-1)
    return tokens, torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
