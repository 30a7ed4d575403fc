"""Greedy sampling in one pass over the logits: each row's argmax (the first index of the maximum, as
torch.argmax) and its log-probability under the row's softmax, -log(sum(exp(x - max))).

What the sampler runs for an all-greedy step with nothing to adjust and no logprobs asked (the steady
state of most serving and benchmark traffic) instead of log_softmax + argmax + gather: one read of the
[N, V] logits where those three read and write them several times (~0.2 ms a step at 256 x 128,256 on an
H200, bench/decode_profile.py).

`sample_race` is the same pass for random sampling at a plain temperature (no top-k / top-p / min-p): the
exponential race's argmax over logits / T - log(noise), with the noise drawn by the sampler's generators, and
the token's logprob. At batch 1 it replaces log_softmax, softmax, a divide and argmax over the vocabulary
(three single-program kernels of ~30 us each at 128,256 on an H200: bench/w4a16.py's profile)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_kernel(logits_ptr, token_ptr, logprob_ptr, part_m_ptr, part_s_ptr, part_i_ptr, part_k_ptr, part_x_ptr,
                   noise_ptr, temp_ptr, stride_row, stride_noise, vocab, chunk, BLOCK: tl.constexpr,
                   SPLIT: tl.constexpr, RACE: tl.constexpr):
    """Program (row, part) reads columns [part * chunk, (part + 1) * chunk) of its row. Each lane keeps its own
    running max, sum of exp(x - max) and first index of the max across the loop (elementwise work only, one
    exp per logit: exp(-|x - m|) scales whichever side is smaller); the lanes are reduced once, at the end. With
    SPLIT 1 the program writes the row's token and logprob; else its part's (max, sum, index) for
    _greedy_combine_kernel. RACE (`sample_race`): the token is the first index of the maximum of the race key
    x / temperature - log(e) (e: the row's Exp(1) noise) instead of x, and the lanes also keep the best key and
    the logit at it; the logprob is that logit's under softmax(x)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, vocab)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    idx = tl.zeros([BLOCK], tl.int32)
    if RACE:
        temp = tl.load(temp_ptr + row)
        kb = tl.full([BLOCK], float("-inf"), tl.float32)
        xb = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        up = x > m  # strictly: a lane keeps the first index of its maximum
        d = tl.exp(tl.where(up, m - x, x - m))
        d = tl.where(x == float("-inf"), 0.0, d)  # (-inf - -inf is nan: a -inf logit adds nothing)
        s = tl.where(up, s * d + 1.0, s + d)
        m = tl.where(up, x, m)
        if RACE:
            e = tl.load(noise_ptr + row * stride_noise + cols, mask=cols < hi, other=1.0)
            key = tl.where(x == float("-inf"), float("-inf"), x / temp - tl.log(e))
            win = key > kb
            idx = tl.where(win, cols, idx)
            xb = tl.where(win, x, xb)
            kb = tl.where(win, key, kb)
        else:
            idx = tl.where(up, cols, idx)
    big = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - big)), 0)
    if RACE:
        kbig = tl.max(kb, 0)
        best = tl.min(tl.where(kb == kbig, idx, 2147483647), 0)
        at = tl.max(tl.where((kb == kbig) & (idx == best), xb, float("-inf")), 0)  # the logit at the best key
    else:
        best = tl.min(tl.where(m == big, idx, 2147483647), 0)  # the first index among the lanes at the maximum
        at = big
    if SPLIT == 1:
        tl.store(token_ptr + row, best.to(tl.int64))
        tl.store(logprob_ptr + row, at - big - tl.log(total))
    else:
        tl.store(part_m_ptr + row * SPLIT + part, big)
        tl.store(part_s_ptr + row * SPLIT + part, total)
        tl.store(part_i_ptr + row * SPLIT + part, best)
        if RACE:
            tl.store(part_k_ptr + row * SPLIT + part, kbig)
            tl.store(part_x_ptr + row * SPLIT + part, at)


@triton.jit
def _greedy_combine_kernel(token_ptr, logprob_ptr, part_m_ptr, part_s_ptr, part_i_ptr, part_k_ptr, part_x_ptr,
                           SPLIT: tl.constexpr, RACE: tl.constexpr):
    """A row's parts, in column order: the maximum of their maxima, the first index at it (RACE: at the maximum
    key), the sums rescaled."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SPLIT)
    pm = tl.load(part_m_ptr + row * SPLIT + k)
    ps = tl.load(part_s_ptr + row * SPLIT + k)
    pi = tl.load(part_i_ptr + row * SPLIT + k)
    big = tl.max(pm, 0)
    total = tl.sum(tl.where(pm == float("-inf"), 0.0, ps * tl.exp(pm - big)), 0)
    if RACE:
        pk = tl.load(part_k_ptr + row * SPLIT + k)
        px = tl.load(part_x_ptr + row * SPLIT + k)
        kbig = tl.max(pk, 0)
        best = tl.min(tl.where(pk == kbig, pi, 2147483647), 0)
        at = tl.max(tl.where((pk == kbig) & (pi == best), px, float("-inf")), 0)
    else:
        best = tl.min(tl.where(pm == big, pi, 2147483647), 0)
        at = big
    tl.store(token_ptr + row, best.to(tl.int64))
    tl.store(logprob_ptr + row, at - big - tl.log(total))


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
    return _launch(logits, None, None, config)


def sample_race(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor,
                config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sampling by the exponential race in the same one pass: each row's token is the first argmax of
    logits / temperature - log(noise), with noise [N, V] float32 Exp(1) draws (the sampler's, from its
    generators): an exact draw from softmax(logits / temperature), the same token as argmax(softmax(logits /
    temperature) / noise) but for rounding. A row with temperature 1 and noise 1 is greedy. Also returns each
    token's logprob under softmax(logits) (the raw distribution, as the sampler reports it).
    temperatures [N] float32 > 0."""
    n = logits.shape[0] if logits.dim() == 2 else -1
    if temperatures.shape != (n,) or temperatures.dtype != torch.float32:
        raise ValueError(f"temperatures must be float32 [{n}], got {temperatures.dtype} {tuple(temperatures.shape)}")
    if noise.shape != logits.shape or noise.dtype != torch.float32 or noise.stride(-1) != 1:
        raise ValueError(f"noise must be float32 {tuple(logits.shape)} with a contiguous last dim, got "
                         f"{noise.dtype} {tuple(noise.shape)}")
    return _launch(logits, temperatures, noise, config)


def _launch(logits, temperatures, noise, config):
    if logits.dim() != 2 or logits.stride(1) != 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [N, V] tensor with a contiguous last dim; got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    n, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: the vocabulary dimension is empty")
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    race = noise is not None
    if n:
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        block = min(cfg["BLOCK"], triton.next_power_of_2(vocab))
        split = cfg.get("SPLIT") or split_for(n, cfg["programs"])
        chunk = -(-vocab // split // block) * block if split > 1 else vocab  # whole blocks per part
        split = -(-vocab // chunk)  # (a tiny vocabulary needs fewer parts)
        split = triton.next_power_of_2(split) if split > 1 else 1  # trailing parts beyond vocab come out empty
        kinds = (torch.float32, torch.float32, torch.int32) + ((torch.float32, torch.float32) if race else ())
        parts = [torch.empty(n * split, dtype=dt, device=logits.device) for dt in kinds] if split > 1 else []
        parts += [tokens] * (5 - len(parts))  # (pointers the build does not read)
        extra = (noise, temperatures, logits.stride(0), noise.stride(0)) if race else (tokens, tokens, logits.stride(0), 0)
        _greedy_kernel[(n, split)](logits, tokens, logprobs, *parts, *extra, vocab, chunk,
                                   BLOCK=block, SPLIT=split, RACE=race, num_warps=cfg["num_warps"])
        if split > 1:
            _greedy_combine_kernel[(n,)](tokens, logprobs, *parts, SPLIT=split, RACE=race, num_warps=1)
    return tokens, logprobs


def warmup(vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every build greedy_sample and sample_race can launch for this vocabulary (one per number of parts:
    a constexpr), so that no step compiles one."""
    x = torch.zeros(2, vocab, dtype=dtype, device=device)
    t, e = torch.ones(2, device=device), torch.ones(2, vocab, device=device)
    for split in (1, 2, 4, 8, 16):
        greedy_sample(x, dict(SPLIT=split))
        sample_race(x, t, e, dict(SPLIT=split))


def greedy_sample_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops it replaces, in float64 for the log-probability."""
    x = logits.double()
    tokens = x.argmax(dim=-1)
    return tokens, torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]


def sample_race_ref(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor):
    """The sampler's torch ops for the same draw (argmax(softmax(x / T) / noise)), the logprob in float64."""
    x = logits.double()
    tokens = (torch.softmax(x / temperatures.double()[:, None], dim=-1) / noise.double()).argmax(dim=-1)
    return tokens, torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
