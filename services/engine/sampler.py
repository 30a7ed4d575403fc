"""From logits to next tokens on the logits' device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

Logprobs are the model's raw distribution (log-softmax of the logits before any penalty or
temperature), as vLLM reports them by default. A request with a seed draws from its own generator,
one row at a time, so its samples do not depend on what else shares the batch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

from services.engine.request import Sequence
from kernels.greedy import greedy_sample, sample_race, warmup as greedy_warmup
from services.engine.structured import apply_bitmask

_NEG_INF = float("-inf")
RACE = True
"""Whether plain-temperature rows take kernels/greedy.py's sample_race on the fused path (bench/w4a16.py turns it
off to measure it)."""
_params_of = operator.attrgetter("params")


def device_tensor(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device` without waiting for the device: `torch.tensor(...,
    device="cuda")` copies from pageable memory and synchronises the stream, which would stall the
    host behind the step in flight (asynchronous scheduling). Pinned and non-blocking instead."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]
    """Raw log-probability of each sampled token."""
    top: list[tuple[list[int], list[float], int] | None] | None
    """Per row, when logprobs were asked: (top ids, their logprobs, rank of the sampled token); None when
    no row asked."""
    token_array: np.ndarray | None = None
    """`token_ids` as an int64 array (for checks over the whole step at once)."""


class DeviceSample:
    """A step's sampled tokens while they may still be on the device. `tokens` [N] (long, on the
    device) feeds the next step's inputs; the host copies are started at once (pinned memory, no
    wait) and `result()` waits for them only: never for work queued after them."""

    def __init__(self, tokens: torch.Tensor, want: list[int | None], parts: tuple):
        self.tokens = tokens
        self._want = want
        self._event = None
        if tokens.device.type == "cuda":
            parts = tuple(None if t is None else t.to("cpu", non_blocking=True) for t in parts)
            self._event = torch.cuda.Event()
            self._event.record()
        self._parts = parts

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        tokens, sampled_lp, ranks, top_lp, top_ids = self._parts
        top = None
        if ranks is not None:
            top = [None] * len(self._want)
            ranks = ranks.tolist()
            if top_lp is not None:
                top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
            for i, k in enumerate(self._want):
                if k is not None:
                    top[i] = (top_ids[i][:k] if k else [], top_lp[i][:k] if k else [], ranks[i])
        array = tokens.numpy()
        return SampleResult(array.tolist(), sampled_lp.tolist(), top, array)


def _plain_temperature(p, vocab: int) -> bool:
    """Whether a random row samples from softmax(logits / temperature) itself: no top-k, top-p or min-p cut."""
    return (p.top_k == -1 or p.top_k >= vocab) and p.top_p >= 1.0 and not p.min_p


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._global = torch.Generator(device=device)
        self._global.manual_seed(seed)
        self._seeded: dict[tuple[str, int], torch.Generator] = {}
        """(request id, sample index) -> the sample's own generator (seeded requests only)."""
        self.fused_greedy = device.type == "cuda"
        """A step with nothing to adjust and no logprobs asked takes its tokens and their logprobs from one pass
        over the logits (kernels/greedy.py): all-greedy, or (`sample_race`) greedy and plain-temperature rows (no
        top-k / top-p / min-p), with the same noise `_draw` would draw. Off on CPU, where the Triton interpreter
        would be slower than torch's ops (the tests turn it on to check it there)."""

    def warmup(self, vocab_size: int, dtype: torch.dtype) -> None:
        """Compile the one-pass greedy kernel before the first request (it is not part of the runner's
        warm-up steps; its integer arguments, the row stride and the vocabulary, are fixed per model)."""
        if self.fused_greedy:
            greedy_warmup(vocab_size, dtype, self.device)

    def forget(self, seq: Sequence) -> None:
        self._seeded.pop((seq.request.request_id, seq.index), None)

    def _generator(self, seq: Sequence, index: int) -> torch.Generator:
        key = (seq.request.request_id, index)
        g = self._seeded.get(key)
        if g is None:
            g = torch.Generator(device=self.device)
            # Each of the n samples of a seeded request gets its own stream, fixed by (seed, index).
            g.manual_seed((seq.params.seed * 1_000_003 + index) % (2**63))
            self._seeded[key] = g
        return g

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int],
                 indexes: list[int] | None = None, bitmask: torch.Tensor | None = None) -> SampleResult:
        """sample() and read the result back at once (the synchronous form)."""
        return self.sample(logits, seqs, eos_ids, indexes, bitmask).result()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int],
               indexes: list[int] | None = None, bitmask: torch.Tensor | None = None,
               distinct: list | None = None) -> "DeviceSample":
        """logits [N, V] (float32, or the model's dtype: upcast here), one row per sequence to extend. `indexes` (default: each sequence's
        own) names the sample a row is for: a prompt about to fork into n samples appears n times,
        once per sample index, all with the prompt's row. `bitmask` [N, ceil(V/32)] int32 (structured
        output, services/engine/structured.py) bans every token whose bit is clear, before anything else.
        Nothing here waits for the device: the tokens stay on it (the next step's inputs read them
        there) and their copy to the host is started; `DeviceSample.result()` waits for it.
        `distinct`: the rows' distinct SamplingParams when the caller has them (a steady decode batch keeps
        them, services/engine/input_batch.py); the per-row list is then only made where a row's differ."""
        # One pass over the batch's parameters: a batch that shares one SamplingParams (the offline
        # API's usual case) reads it once.
        if distinct is None or len(distinct) > 1:
            params = list(map(_params_of, seqs))
            if distinct is None:
                distinct = dict(zip(map(id, params), params)).values()
        else:
            params = distinct * len(seqs)
        adjust = self._needs_adjusting(seqs, distinct)
        if self.fused_greedy and bitmask is None and not adjust and all(p.logprobs is None for p in distinct):
            if all(p.greedy for p in distinct):
                tokens, sampled_lp = greedy_sample(logits)
                return DeviceSample(tokens, [None] * len(params), (tokens, sampled_lp, None, None, None))
            vocab = logits.shape[1]
            if RACE and all(p.greedy or _plain_temperature(p, vocab) for p in distinct):
                tokens, sampled_lp = sample_race(logits, *self._race_inputs(logits, seqs, params, indexes))
                return DeviceSample(tokens, [None] * len(params), (tokens, sampled_lp, None, None, None))
        logits = logits.float()  # (the model's dtype from the runner; a no-op on float32)
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        x = logits if bitmask is None else apply_bitmask(logits, bitmask)
        if adjust:
            x = self._adjusted(x, logits, seqs, eos_ids)
        tokens = self._draw(x, seqs, params, distinct, indexes)
        return self._read_back(raw_logprobs, tokens, params, distinct)

    @staticmethod
    def _needs_adjusting(seqs: list[Sequence], distinct) -> bool:
        """Whether some row asks for a logit bias, min_tokens' bans or penalties."""
        return any(p.min_tokens or p.has_penalties or p.logit_bias for p in distinct) and any(
            s.num_output_tokens < s.params.min_tokens or s.params.has_penalties or s.params.logit_bias for s in seqs)

    def _adjusted(self, x: torch.Tensor, logits: torch.Tensor, seqs: list[Sequence],
                  eos_ids: frozenset[int]) -> torch.Tensor:
        """`x` with logit bias, min_tokens' bans and penalties applied (on a copy: the raw logits stay
        untouched for logprobs)."""
        x = x.clone() if x is logits else x
        self._apply_logit_bias(x, seqs)
        self._apply_min_tokens(x, seqs, eos_ids)
        self._apply_penalties(x, seqs)
        return x

    def _draw(self, x: torch.Tensor, seqs: list[Sequence], params: list, distinct,
              indexes: list[int] | None) -> torch.Tensor:
        """One token per row, on the device: the argmax for greedy rows; for the others an exponential
        race over their filtered distribution, seeded rows drawing from their own sample's generator."""
        n, vocab = x.shape
        if all(p.greedy for p in distinct):  # the common all-greedy batch: no index tensors, no host round trip
            return x.argmax(dim=-1)
        greedy = [p.greedy for p in params]
        g_rows = [i for i, gr in enumerate(greedy) if gr]
        r_rows = [i for i, gr in enumerate(greedy) if not gr]
        tokens = torch.empty(n, dtype=torch.long, device=x.device)
        if g_rows:
            idx = device_tensor(g_rows, x.device)
            tokens[idx] = x[idx].argmax(dim=-1)
        idx = device_tensor(r_rows, x.device)
        probs = self._probs(x[idx], [seqs[i] for i in r_rows])
        noise = self._noise(seqs, r_rows, indexes, vocab, x.device)
        # argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race).
        tokens[idx] = (probs / noise).argmax(dim=-1)
        return tokens

    def _race_inputs(self, logits: torch.Tensor, seqs: list[Sequence], params: list,
                     indexes: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """sample_race's temperatures [N] and Exp(1) noise [N, V] (`_noise`, as `_draw` draws it), 1 and 1 for
        greedy rows."""
        n, vocab = logits.shape
        dev = logits.device
        r_rows = [i for i, p in enumerate(params) if not p.greedy]
        temps = device_tensor([1.0 if p.greedy else seqs[i].params.temperature for i, p in enumerate(params)], dev,
                              torch.float32)
        if len(r_rows) == n:
            return temps, self._noise(seqs, r_rows, indexes, vocab, dev)
        noise = torch.ones((n, vocab), device=dev)
        if r_rows:
            noise[device_tensor(r_rows, dev)] = self._noise(seqs, r_rows, indexes, vocab, dev)
        return temps, noise

    def _noise(self, seqs: list[Sequence], rows: list[int], indexes: list[int] | None, vocab: int,
               device: torch.device) -> torch.Tensor:
        """Exp(1) noise [len(rows), vocab] for the sampled rows `rows`, the one way both sampling paths draw it
        (so a seed gives the same tokens on either): seeded rows from their own sample's generator, in row
        order, the others in one draw from the global generator."""
        unseeded = [j for j, i in enumerate(rows) if seqs[i].params.seed is None]
        draw = lambda k: torch.empty((k, vocab), device=device, dtype=torch.float32).exponential_(  # noqa: E731
            generator=self._global)
        if unseeded and len(unseeded) == len(rows):  # (one draw, as for the unseeded rows below)
            return draw(len(rows))
        noise = torch.empty((len(rows), vocab), device=device, dtype=torch.float32)
        for j, i in enumerate(rows):
            if seqs[i].params.seed is not None:
                index = seqs[i].index if indexes is None else indexes[i]
                noise[j].exponential_(generator=self._generator(seqs[i], index))
        if unseeded:
            noise[device_tensor(unseeded, device)] = draw(len(unseeded))
        return noise

    @staticmethod
    def _read_back(raw_logprobs: torch.Tensor, tokens: torch.Tensor, params: list, distinct) -> "DeviceSample":
        """The sampled tokens with their raw logprobs (ranks and top-k where some row asked), their copy
        to the host started."""
        sampled_lp = raw_logprobs.gather(1, tokens[:, None])[:, 0]
        if all(p.logprobs is None for p in distinct):
            want, kmax = [None] * len(params), None
        else:
            want = [p.logprobs for p in params]
            kmax = max((k for k in want if k is not None), default=None)
        ranks = top_lp = top_ids = None
        if kmax is not None:
            ranks = (raw_logprobs > sampled_lp[:, None]).sum(dim=-1) + 1
            if kmax > 0:
                top_lp, top_ids = raw_logprobs.topk(kmax, dim=-1)
        return DeviceSample(tokens, want, (tokens, sampled_lp, ranks, top_lp, top_ids))

    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, s in enumerate(seqs):
            if s.params.logit_bias:
                ids = device_tensor(list(s.params.logit_bias), x.device, torch.long)
                x[i, ids] += device_tensor(list(s.params.logit_bias.values()), x.device, x.dtype)

    @staticmethod
    def _apply_min_tokens(x: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int]) -> None:
        for i, s in enumerate(seqs):
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
                if banned:
                    x[i, banned] = _NEG_INF

    @staticmethod
    def _apply_penalties(x: torch.Tensor, seqs: list[Sequence]) -> None:
        vocab = x.shape[1]
        for i, s in enumerate(seqs):
            p = s.params
            if not p.has_penalties:
                continue
            out_ids = torch.tensor(s.output_token_ids, dtype=torch.long, device=x.device)
            counts = torch.zeros(vocab, device=x.device).scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float))
            row = x[i]
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                seen[torch.tensor(s.token_ids[:s.num_prompt_tokens], dtype=torch.long, device=x.device)] = True
                penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, penalised, row))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    @staticmethod
    def _probs(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = device_tensor([s.params.temperature for s in seqs], x.device)
        x = x / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        top_ps = [s.params.top_p for s in seqs]
        min_ps = [s.params.min_p for s in seqs]
        vocab = x.shape[1]
        if any(k != -1 and k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_x, order = x.sort(dim=-1, descending=True)
            keep = torch.ones_like(sorted_x, dtype=torch.bool)
            ks = device_tensor([k if k != -1 else vocab for k in top_ks], x.device)
            keep &= torch.arange(vocab, device=x.device)[None, :] < ks[:, None]
            ps = device_tensor(top_ps, x.device)
            sorted_x = sorted_x.masked_fill(~keep, _NEG_INF)
            cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
            # Keep a token if the mass before it is still short of top_p (the first always stays).
            keep &= (cum - sorted_x.softmax(dim=-1)) < ps[:, None]
            x = torch.full_like(x, _NEG_INF).scatter(1, order, sorted_x.masked_fill(~keep, _NEG_INF))
        probs = x.softmax(dim=-1)
        if any(m > 0 for m in min_ps):
            mp = device_tensor(min_ps, x.device)
            probs = probs.masked_fill(probs < mp[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs
