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

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: frozenset[int], pin_memory: bool = False):
        self.model_dir = Path(model_dir)
        self.pin_memory = pin_memory
        """Masks in page-locked memory, so their copy to the GPU does not wait for the running forward."""
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="folio-grammar")
        self._compiler = None
        self._batch = None
        """xgrammar's batch matcher: fills many rows' masks on its own threads."""
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
            info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            self._batch = xgr.BatchGrammarMatcher()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        out = seq.output_token_ids
        for t in out[done:]:
            if not m.is_terminated() and not m.accept_token(t):
                log.warning("grammar matcher of %s rejected token %d", seq.request.request_id, t)
        self._matchers[seq.seq_id] = (m, len(out))
        return m

    def fill(self, seqs: list[Sequence]) -> tuple[torch.Tensor | None, dict[int, str]]:
        """The [len(seqs), words] int32 bitmask for these rows (all bits set for unconstrained rows; None
        when no row is constrained), and the rows that must end now instead of sampling, with why:

        - "error": a dead end. The grammar allows no token at all (e.g. a rule that never terminates),
          so any sample would leave it; the sequence ends without a new token. See docs/structured-output.md.
        - "stop": the grammar is complete and allows only EOS / stop tokens, which min_tokens still bans;
          the grammar wins (as in vLLM) and the sequence ends where its output is complete.

        A row whose matcher already ended (EOS accepted; ignore_eos keeps generating) gets EOS only."""
        first: dict[int, int] = {}  # seq_id -> its first row (a prompt about to fork into n has n rows)
        copies: list[tuple[int, int]] = []
        for i, s in enumerate(seqs):
            if self.constrained(s):
                if s.seq_id in first:
                    copies.append((i, first[s.seq_id]))
                else:
                    first[s.seq_id] = i
        if not first:
            return None, {}
        rows = list(first.values())
        # all ones (xgr.allocate_token_bitmask's layout); pinned (cached by torch) when the sampler is on a GPU
        mask = torch.full((len(seqs), (self.vocab_size + 31) // 32), -1, dtype=torch.int32, pin_memory=self.pin_memory)
        matchers = [self._matcher(seqs[i]) for i in rows]
        live = [(i, m) for i, m in zip(rows, matchers) if not m.is_terminated()]
        if live:  # xgrammar refuses a matcher that has accepted its stop token: those rows get EOS below
            self._batch.batch_fill_next_token_bitmask([m for _, m in live], mask, [i for i, _ in live])
        empty = (~mask[rows].any(dim=1)).tolist()  # one op for the whole batch
        ended: dict[int, str] = {}
        for i, m, none in zip(rows, matchers, empty):
            s = seqs[i]
            if m.is_terminated():  # EOS accepted and ignore_eos keeps generating: EOS only
                self._only(mask, i, self.eos_ids[:1])
            elif none:
                ended[i] = "error"
            elif s.num_output_tokens < s.params.min_tokens and self._only_stops(mask[i], s):
                ended[i] = "stop"
        for i in ended:
            mask[i] = -1  # all allowed: the row's sample is thrown away, so keep its softmax finite
        for i, j in copies:
            mask[i] = mask[j]
            if j in ended:
                ended[i] = ended[j]
        return mask, ended

    def _only_stops(self, row: torch.Tensor, seq: Sequence) -> bool:
        """Whether every token `row` allows is one min_tokens bans (EOS unless ignore_eos, stop token ids)."""
        banned = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos_ids)
        if not banned:
            return False
        rest = row.clone()
        for t in banned:
            rest[t // 32] &= ~_bit(t)
        return not bool(rest.any())

    @staticmethod
    def _only(mask: torch.Tensor, i: int, ids: list[int]) -> None:
        mask[i] = 0
        for t in ids:
            mask[i, t // 32] |= _bit(t)

    def forget(self, req: Request) -> None:
        self._compiled.pop(req.request_id, None)
        for s in req.seqs:
            self._matchers.pop(s.seq_id, None)


def _bit(t: int) -> int:
    """Token t's bit in its int32 word, as a signed int32 value (two's complement)."""
    b = 1 << (t % 32)
    return b - (1 << 32) if b >= 1 << 31 else b


def apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] with every token whose bit is clear set to -inf (on x's device, all rows at once)."""
    n, vocab = x.shape
    words = bitmask.to(x.device, non_blocking=True)
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().reshape(n, -1)[:, :vocab]
    return x.masked_fill(~allowed, float("-inf"))
