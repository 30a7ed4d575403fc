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
def _greedy_kernel(logits_ptr, token_ptr, logprob_ptr, part_m_ptr, part_s_ptr, part_i_ptr, stride_row, vocab,
                   chunk, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Program (row, part) reads columns [part * chunk, (part + 1) * chunk) of its row. Each lane keeps its own
    running max, sum of exp(x - max) and first index of the max across the loop (elementwise work only, one
    exp per logit: exp(-|x - m|) scales whichever side is smaller); the lanes are reduced once, at the end. With
    SPLIT 1 the program writes the row's token and logprob; else its part's (max, sum, index) for
    _greedy_combine_kernel."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, vocab)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    idx = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        up = x > m  # strictly: a lane keeps the first index of its maximum
        d = tl.exp(tl.where(up, m - x, x - m))
        d = tl.where(x == float("-inf"), 0.0, d)  # (-inf - -inf is nan: a -inf logit adds nothing)
        s = tl.where(up, s * d + 1.0, s + d)
        idx = tl.where(up, cols, idx)
        m = tl.where(up, x, m)
    big = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - big)), 0)
    best = tl.min(tl.where(m == big, idx, 2147483647), 0)  # the first index among the lanes at the maximum
    if SPLIT == 1:
        tl.store(token_ptr + row, best.to(tl.int64))
        tl.store(logprob_ptr + row, -tl.log(total))
    else:
        tl.store(part_m_ptr + row * SPLIT + part, big)
        tl.store(part_s_ptr + row * SPLIT + part, total)
        tl.store(part_i_ptr + row * SPLIT + part, best)


@triton.jit
def _greedy_combine_kernel(token_ptr, logprob_ptr, part_m_ptr, part_s_ptr, part_i_ptr, SPLIT: tl.constexpr):
    """A row's parts, in column order: the maximum of their maxima, the first index at it, the sums rescaled."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SPLIT)
    pm = tl.load(part_m_ptr + row * SPLIT + k)
    ps = tl.load(part_s_ptr + row * SPLIT + k)
    pi = tl.load(part_i_ptr + row * SPLIT + k)
    big = tl.max(pm, 0)
    total = tl.sum(tl.where(pm == float("-inf"), 0.0, ps * tl.exp(pm - big)), 0)
    best = tl.min(tl.where(pm == big, pi, 2147483647), 0)
    tl.store(token_ptr + row, best.to(tl.int64))
    tl.store(logprob_ptr + row, -tl.log(total))


DEFAULT_CONFIG = dict(BLOCK=2048, num_warps=8, programs=512)
"""BLOCK columns per loop step; `programs`: each row's columns are split in parts (a power of two, up to 16) until
the rows' programs reach this many, so that a few hundred rows still fill the SMs (bench/small_profile.py
--sections greedy sweeps these)."""


def split_for(n: int, programs: int) -> int:
    split = 1
    while split < 16 and n * split < programs:
        split *= 2
    return split


def greedy_sample(logits: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (any float dtype, last dim contiguous) -> (tokens [N] int64, logprobs [N] float32).
    `config`: DEFAULT_CONFIG's keys, for sweeps; SPLIT forces the number of parts."""
    if logits.dim() != 2 or logits.stride(1) != 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [N, V] tensor with a contiguous last dim; got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    n, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: the vocabulary dimension is empty")
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        block = min(cfg["BLOCK"], triton.next_power_of_2(vocab))
        split = cfg.get("SPLIT") or split_for(n, cfg["programs"])
        chunk = -(-vocab // split // block) * block if split > 1 else vocab  # whole blocks per part
        split = -(-vocab // chunk)  # (a tiny vocabulary needs fewer parts)
        split = triton.next_power_of_2(split) if split > 1 else 1  # trailing parts beyond vocab come out empty
        parts = [torch.empty(n * split, dtype=dt, device=logits.device)
                 for dt in (torch.float32, torch.float32, torch.int32)] if split > 1 else [tokens] * 3
        _greedy_kernel[(n, split)](logits, tokens, logprobs, *parts, logits.stride(0), vocab, chunk,
                                   BLOCK=block, SPLIT=split, num_warps=cfg["num_warps"])
        if split > 1:
            _greedy_combine_kernel[(n,)](tokens, logprobs, *parts, SPLIT=split, num_warps=1)
    return tokens, logprobs


def warmup(vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every build greedy_sample can launch for this vocabulary (one per number of parts: a
    constexpr), so that no step compiles one."""
    x = torch.zeros(2, vocab, dtype=dtype, device=device)
    for split in (1, 2, 4, 8, 16):
        greedy_sample(x, dict(SPLIT=split))


def greedy_sample_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops it replaces, in float64 for the log-probability."""
    x = logits.double()
    tokens = x.argmax(dim=-1)
    return tokens, torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
