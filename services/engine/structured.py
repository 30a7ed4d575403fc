"""Structured output in the engine: grammars compiled off the step (a thread, cached), one matcher per sequence, token bitmasks.

The engine holds a request whose grammar is still compiling out of the scheduler (the batch runs on
without it) and admits it once its compile is done. Each sequence gets its own xgrammar matcher,
built lazily from the request's compiled grammar and fast-forwarded over the sequence's output tokens,
so forks (n > 1), preemption (recompute keeps the tokens) and any later sequence stay in step with
what was generated. Per step, `fill` writes one bitmask row per constrained row (int32 words, bit i
of word w allows token 32 w + i); the sampler applies it on the logits' device (services/engine/sampler.py).
A row whose grammar allows no token ends with finish reason "error" instead of sampling (a dead end).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from services.common.structured_output import StructuredOutputs
from services.engine.request import Request, Sequence

log = logging.getLogger("folio.engine")

_CACHE_SIZE = 256


class GrammarBackend:
    """Compiles StructuredOutputs against the model's tokenizer in one background thread, cached by spec."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: frozenset[int], pin_memory: bool = False,
                 fill_threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.pin_memory = pin_memory
        """Masks in page-locked memory, so their copy to the GPU does not wait for the running forward."""
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.grammar_vocab = vocab_size
        """Token ids xgrammar looks at (set by _init): the tokenizer's, which may be far fewer than the
        model's (an embedding padded past the tokenizer); ids past it are never allowed."""
        self._words = (vocab_size + 31) // 32
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="folio-grammar")
        self._compiler = None
        self._filler = _Filler(fill_threads or default_fill_threads())
        self._scratch: torch.Tensor | None = None
        """[rows, grammar words] int32: xgrammar fills a whole row of its own width, so when the model's
        vocabulary is wider, rows are filled here and copied into the mask."""
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._matchers: dict[int, tuple[object, int]] = {}
        """seq_id -> (its matcher, output tokens it has accepted)."""
        self._compiled: dict[str, object] = {}
        """request id -> its compiled grammar (while the request lives)."""
        # Import xgrammar (and transformers, ~2.5 s of CPU) and index the vocabulary now, while the
        # engine starts, not on the first structured request while a batch is running.
        self._pool.submit(self._init)

    # --- compiling (the background thread) ----------------------------------------------------
    def compile(self, so: StructuredOutputs) -> Future:
        fut = self._cache.get(so.key)
        if fut is not None and not (fut.done() and fut.exception() is not None):
            self._cache.move_to_end(so.key)
            return fut
        fut = self._pool.submit(self._compile, so)
        self._cache[so.key] = fut
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return fut

    def _compile(self, so: StructuredOutputs):
        self._init()
        return self._compiler.compile_grammar(so.grammar_obj())

    def _init(self) -> None:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(self.model_dir / "tokenizer.json"))
            self.grammar_vocab = _grammar_vocab(hf_tok, self.vocab_size, self.eos_ids)
            info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=self.grammar_vocab, stop_token_ids=self.eos_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    @property
    def fill_threads(self) -> int:
        """Threads filling a step's masks (default_fill_threads unless the engine gave a number)."""
        return self._filler.threads

    @property
    def fill_mode(self) -> str:
        return self._filler.mode

    def set_fill(self, threads: int, mode: str = "pool") -> None:
        """Fill masks on `threads` threads: "pool" (Folio's threads, kept) or "xgrammar" (its batch fill's own)."""
        old, self._filler = self._filler, _Filler(threads, mode)
        old.shutdown()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._filler.shutdown()

    # --- per request / sequence ---------------------------------------------------------------
    def attach(self, req: Request, compiled) -> str | None:
        """Constrain `req` by its compiled grammar. A resumed stream's tokens (structured_outputs.resume_tokens)
        are checked against it now: an error message naming the field if the grammar rejects one, else None."""
        so = req.params.structured_outputs
        if so.resume_tokens:
            import xgrammar as xgr

            m = xgr.GrammarMatcher(compiled)
            for j, t in enumerate(req.prompt_token_ids[-so.resume_tokens:]):
                if m.is_terminated() or not m.accept_token(t):
                    return (f"{so.field_name}.resume_tokens: the prompt's last {so.resume_tokens} tokens do not "
                            f"follow the grammar (token {j}, id {t}, is not allowed there)")
        self._compiled[req.request_id] = compiled
        return None

    @property
    def active(self) -> bool:
        """Some request holds a grammar (else a step need not look at its rows at all)."""
        return bool(self._compiled)

    def constrained(self, seq: Sequence) -> bool:
        return seq.request.request_id in self._compiled

    def constrains_any(self, out) -> bool:
        """Whether a row this step samples (SchedulerOutput `out`) is constrained."""
        return bool(self._compiled) and any(s.sample_row is not None and self.constrained(s.seq) for s in out.scheduled)

    def _matcher(self, seq: Sequence):
        """The sequence's matcher, advanced over every output token it has (built on first use)."""
        import xgrammar as xgr

        m, done = self._matchers.get(seq.seq_id, (None, 0))
        if m is None:
            m = xgr.GrammarMatcher(self._compiled[seq.request.request_id])
            k = seq.params.structured_outputs.resume_tokens  # a resumed stream: its output so far is in the prompt
            for t in seq.token_ids[seq.num_prompt_tokens - k:seq.num_prompt_tokens] if k else []:
                if not m.is_terminated() and not m.accept_token(t):
                    log.warning("grammar matcher of %s rejected resumed token %d", seq.request.request_id, t)
        n_out = seq.num_output_tokens
        if done < n_out:  # only the new tokens (one per decode step), not a copy of the whole output
            for t in seq.token_ids[seq.num_prompt_tokens + done:]:
                if not m.is_terminated() and not m.accept_token(t):
                    log.warning("grammar matcher of %s rejected token %d", seq.request.request_id, t)
        self._matchers[seq.seq_id] = (m, n_out)
        return m

    def fill(self, seqs: list[Sequence]) -> tuple[torch.Tensor | None, dict[int, str]]:
        """The [len(seqs), words] int32 bitmask for these rows (all bits set for unconstrained rows; None
        when no row is constrained), and the rows that must end now instead of sampling, with why:

        - "error": a dead end. The grammar allows no token at all (e.g. a rule that never terminates),
          so any sample would leave it; the sequence ends without a new token. See docs/structured-output.md.
        - "stop": the grammar is complete and allows only EOS / stop tokens, which min_tokens still bans;
          the grammar wins (as in vLLM) and the sequence ends where its output is complete.

        A row whose matcher already ended (EOS accepted; ignore_eos keeps generating) gets EOS only.
        The mask is written through numpy (one thread): torch's CPU ops on it would wake its OpenMP
        pool, whose spinning threads compete with xgrammar's fill threads."""
        first: dict[int, int] = {}  # seq_id -> its first row (a prompt about to fork into n has n rows)
        copies: list[tuple[int, int]] = []
        free: list[int] = []  # unconstrained rows
        compiled = self._compiled
        for i, s in enumerate(seqs):
            if s.request.request_id not in compiled:
                free.append(i)
            elif s.seq_id in first:
                copies.append((i, first[s.seq_id]))
            else:
                first[s.seq_id] = i
        if not first:
            return None, {}
        # pinned (torch's caching host allocator reuses a block only once the copy that read it is done)
        mask = torch.empty((len(seqs), self._words), dtype=torch.int32, pin_memory=self.pin_memory)
        words = mask.numpy()
        if free:
            words[free] = -1
        live_rows, live, done_rows = [], [], []
        for i in first.values():
            m = self._matcher(seqs[i])
            if m.is_terminated():  # EOS accepted and ignore_eos keeps generating: EOS only
                done_rows.append(i)
            else:
                live_rows.append(i)
                live.append(m)
        ended: dict[int, str] = {}
        if live:  # xgrammar refuses a matcher that has accepted its stop token: those rows get EOS below
            filled = self._fill_rows(live, mask, live_rows)
            for i, none in zip(live_rows, ~filled.any(axis=1)):
                s = seqs[i]
                if none:
                    ended[i] = "error"
                elif s.num_output_tokens < s.params.min_tokens and self._only_stops(words[i], s):
                    ended[i] = "stop"
        if done_rows:
            words[done_rows] = 0
            eos = self.eos_ids[0]
            words[done_rows, eos // 32] = _bit(eos)
        if ended:
            words[list(ended)] = -1  # all allowed: the row's sample is thrown away, so keep its softmax finite
        for i, j in copies:
            words[i] = words[j]
            if j in ended:
                ended[i] = ended[j]
        return mask, ended

    def _fill_rows(self, matchers: list, mask: torch.Tensor, rows: list[int]):
        """xgrammar's batch fill of `rows` of `mask`; returns those rows' grammar words (numpy [k, gwords]).
        Ids past the grammar's vocabulary (a padded embedding) stay banned."""
        gwords = (self.grammar_vocab + 31) // 32
        words = mask.numpy()
        if gwords == self._words:
            self._filler.fill(matchers, mask, rows)
            return words[rows]
        k = len(rows)
        if self._scratch is None or self._scratch.shape[0] < k:
            self._scratch = torch.empty((max(k, 64), gwords), dtype=torch.int32)
        buf = self._scratch[:k]
        self._filler.fill(matchers, buf, list(range(k)))
        filled = buf.numpy()
        words[rows, :gwords] = filled
        words[rows, gwords:] = 0
        return filled

    def _only_stops(self, row, seq: Sequence) -> bool:
        """Whether every token `row` (numpy int32 words) allows is one min_tokens bans (EOS unless
        ignore_eos, stop token ids)."""
        banned = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos_ids)
        if not banned:
            return False
        rest = row.copy()
        for t in banned:
            if t < 32 * len(rest):
                rest[t // 32] &= ~_bit(t)
        return not rest.any()

    def forget(self, req: Request) -> None:
        self._compiled.pop(req.request_id, None)
        for s in req.seqs:
            self._matchers.pop(s.seq_id, None)


class _Filler:
    """Fills many matchers' mask rows at once. xgrammar's BatchGrammarMatcher starts a new pool of its
    max_threads threads on every call and joins it (cpp/grammar_matcher.cc, BatchFillNextTokenBitmask),
    a fixed cost each step; "pool" keeps `threads - 1` threads instead and hands each a contiguous slice
    of the rows (xgrammar releases the GIL while it fills), the calling thread filling the first slice.
    "xgrammar" is its own batch fill (kept to measure against: bench/structured.py --gpu)."""

    MIN_ROWS = 4
    """Rows per thread below which a hand-off costs more than it saves."""

    def __init__(self, threads: int, mode: str = "pool"):
        if threads < 1:
            raise ValueError(f"fill_threads: must be at least 1, got {threads}")
        if mode not in ("pool", "xgrammar"):
            raise ValueError(f"fill mode: 'pool' or 'xgrammar', got {mode!r}")
        self.threads, self.mode = threads, mode
        self._batch: list = []
        """xgrammar batch matchers: one of `threads` threads ("xgrammar"), or one of one thread per slice."""
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="folio-fill") if (
            mode == "pool" and threads > 1) else None

    def fill(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        if not self._batch:  # xgrammar is imported off the engine's start (GrammarBackend._init)
            import xgrammar as xgr

            self._batch = ([xgr.BatchGrammarMatcher(self.threads)] if self.mode == "xgrammar"
                           else [xgr.BatchGrammarMatcher(1) for _ in range(self.threads)])
        n = len(matchers)
        parts = min(self.threads, n // self.MIN_ROWS) if self._pool is not None else 1
        if parts <= 1:
            self._batch[0].batch_fill_next_token_bitmask(matchers, bitmask, rows)
            return
        cut = [n * j // parts for j in range(parts + 1)]
        futures = [self._pool.submit(self._batch[j].batch_fill_next_token_bitmask, matchers[a:b], bitmask, rows[a:b])
                   for j, (a, b) in enumerate(zip(cut[1:-1], cut[2:]), 1)]
        self._batch[0].batch_fill_next_token_bitmask(matchers[:cut[1]], bitmask, rows[:cut[1]])
        for f in futures:
            f.result()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def default_fill_threads() -> int:
    """Mask-fill threads: half the CPUs this process may use (its affinity and cgroup quota), at most 4.
    xgrammar's own default, half of std::thread::hardware_concurrency(), counts every CPU of the host,
    which in a container can be many more than it may run on. At most 4: on the H200 machine (16 CPUs)
    xgrammar's batch fill at batch 64 took 1.8 / 1.8 / 1.4 / 1.5 / 1.7 ms on 1 / 2 / 4 / 8 / 16 threads
    while CPU time per step grew from 5.4 to 9.8 ms (docs/structured-output.md)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(4, n // 2))


def _grammar_vocab(hf_tok, model_vocab: int, eos_ids: list[int]) -> int:
    """The token ids xgrammar needs to know: up to the tokenizer's largest id (and the EOS ids), rounded
    up to a whole mask word, at most the model's vocabulary. Ids past it cannot come out of the
    tokenizer, so the grammar never allows them; leaving them out of xgrammar's vocabulary matters
    because xgrammar treats each as a special token and walks them all on every fill and accept
    (measured: 123 us a row per fill with 15,442 real ids in a 128,256 vocabulary, 12 us without)."""
    top = max([max(hf_tok.get_vocab().values(), default=0), *eos_ids]) + 1
    return min(model_vocab, -(-top // 32) * 32)


def _bit(t: int) -> int:
    """Token t's bit in its int32 word, as a signed int32 value (two's complement)."""
    b = 1 << (t % 32)
    return b - (1 << 32) if b >= 1 << 31 else b


APPLY_BACKENDS = ("torch", "xgrammar")
"""How apply_bitmask bans tokens: Folio's torch ops (any device), or xgrammar's kernel for the logits'
device (its C++ loop on CPU, its Triton kernel on CUDA)."""


def apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor, backend: str = "xgrammar") -> torch.Tensor:
    """Logits [N, V] with every token whose bit is clear set to -inf, all rows at once, in place (x is
    returned; the sampler has taken the raw log-softmax before). `bitmask` [N, ceil(V/32)] int32 is
    copied to x's device without waiting (it is pinned on CUDA). xgrammar's kernel is one pass over the
    logits (measured on CPU, batch 64 x 128,256: 39 ms against 117 ms for the torch ops); "torch" is the
    reference the tests hold it to."""
    n, vocab = x.shape
    words = bitmask.to(x.device, non_blocking=True)
    if backend == "xgrammar" and x.device.type in ("cpu", "cuda") and x.dtype in (torch.float32, torch.float16,
                                                                                  torch.bfloat16):
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(x, words, vocab_size=vocab)
        return x
    if backend not in APPLY_BACKENDS:
        raise ValueError(f"backend: one of {APPLY_BACKENDS}, got {backend!r}")
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().reshape(n, -1)[:, :vocab]
    return x.masked_fill_(~allowed, float("-inf"))
