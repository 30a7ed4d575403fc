"""Structured output in the engine: grammars compiled off the step (a thread, cached), one matcher per sequence, token bitmasks.

The engine holds a request whose grammar is still compiling out of the scheduler (the batch runs on
without it) and admits it once its compile is done. Each sequence gets its own xgrammar matcher,
built lazily from the request's compiled grammar and fast-forwarded over the sequence's output tokens,
so forks (n > 1), preemption (recompute keeps the tokens) and any later sequence stay in step with
what was generated. Per step, `fill` writes one bitmask row per constrained row (int32 words, bit i
of word w allows token 32 w + i); the sampler applies it on the logits' device (services/engine/sampler.py).
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

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: frozenset[int]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="folio-grammar")
        self._compiler = None
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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- per request / sequence ---------------------------------------------------------------
    def attach(self, req: Request, compiled) -> None:
        self._compiled[req.request_id] = compiled

    def constrained(self, seq: Sequence) -> bool:
        return seq.request.request_id in self._compiled

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

    def fill(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The [len(seqs), words] int32 bitmask for these rows (all bits set for unconstrained rows),
        or None when no row is constrained. A constrained row that allows no token gets EOS only, so
        the sequence ends rather than sampling outside its grammar."""
        rows = [i for i, s in enumerate(seqs) if self.constrained(s)]
        if not rows:
            return None
        import xgrammar as xgr

        mask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)  # all ones
        for i in rows:
            m = self._matcher(seqs[i])
            m.fill_next_token_bitmask(mask, i)
            if not bool(mask[i].any()) and self.eos_ids:
                e = self.eos_ids[0]
                bit = 1 << (e % 32)
                mask[i, e // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 two's complement
        return mask

    def forget(self, req: Request) -> None:
        self._compiled.pop(req.request_id, None)
        for s in req.seqs:
            self._matchers.pop(s.seq_id, None)


def apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] with every token whose bit is clear set to -inf (on x's device, all rows at once)."""
    n, vocab = x.shape
    words = bitmask.to(x.device, non_blocking=True)
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().reshape(n, -1)[:, :vocab]
    return x.masked_fill(~allowed, float("-inf"))
