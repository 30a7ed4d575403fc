"""The engine loop: add requests, step (schedule -> execute -> sample -> update -> emit), emit token deltas.

`LLMEngine` is synchronous and single-threaded; the offline `LLM` drives it in a loop and the gRPC
engine service drives it from a background thread. It speaks tokens only: it stops on EOS, stop
token ids, min/max tokens and the context length, and each step emits per-sequence deltas (new token
ids, logprobs, finish reasons). Text and stop strings belong to services/common/output_processor.py.
Requests are validated here so both paths give the same errors.

Files: this one is the loop (requests in, step, deltas out); building the runner and sizing the KV pool is
services/engine/engine_setup.py; a launched step's record and its rows (asynchronous scheduling's plumbing) is
services/engine/inflight.py; the deltas handed out are assembled in services/engine/engine_outputs.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import time
from collections.abc import Callable

import torch

from services.common.engine_load import EngineLoad
from services.common.errors import quote
from services.common.model_location import resolve_model_path
from services.common.outputs import RequestDelta
from services.common.sampling_params import BeamSearchParams, SamplingParams
from services.common.tokenizer import Tokenizer
from services.engine.attention import default_backend
from services.engine.beam_search import BeamSearch, sampling_params_for
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.engine_outputs import request_delta
from services.engine.engine_setup import eos_from_config, fit_kv_pool, load_runner, prepare_runner
from services.engine.inflight import InFlight, fill_pending_inputs, sample_step, sampled_by_seq
from services.engine.model.loader import read_config, resolve_dtype
from services.engine.request import Request, Sequence, SeqStatus
from services.engine.sampler import Sampler
from services.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.structured import GrammarBackend

__all__ = ["EngineConfig", "LLMEngine", "QueueFullError", "release_frozen"]

log = logging.getLogger("folio.engine")


def release_frozen() -> None:
    """Hand the objects frozen at an engine's start back to the cyclic collector. The engine calls
    `gc.freeze()` once built, so collections during steps skip its long-lived objects; but frozen objects
    in reference cycles are never collected, so a dropped engine's weights and KV pool (gigabytes of
    device memory) would stay allocated for the life of the process. Called at shutdown and when an
    offline `LLM` is dropped; the next collection frees whatever is no longer referenced."""
    gc.unfreeze()


class LLMEngine:
    """One engine shard's model, KV pool, scheduler and sampler, driven one `step` at a time."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model_path(config.model)
        self.hf_config = read_config(self.model_dir)
        dev = config.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.tokenizer = Tokenizer(self.model_dir) if (self.model_dir / "tokenizer.json").exists() else None
        self.attention_backend = config.attention_backend or default_backend(str(self.device))
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.runner = load_runner(config, self.model_dir, self.hf_config, self.dtype, self.device,
                                  self.attention_backend)
        self.vocab_size = self.runner.cfg.vocab_size
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        num_blocks, self.max_model_len = fit_kv_pool(config, self.runner, self.device,
                                                     self.max_num_batched_tokens)
        prepare_runner(config, self.runner, self.device, num_blocks, self.max_model_len,
                       self.max_num_batched_tokens)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                   sliding_window=self.runner.model.kv_sliding_window)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else eos_from_config(self.hf_config)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, self.max_num_batched_tokens, config.max_waiting_requests,
                            self.max_model_len), self.blocks, eos_token_ids=self.eos_token_ids)
        self.sampler = Sampler(self.device, config.seed or 0)
        self.sampler.warmup(self.vocab_size, self.dtype)
        self.requests: dict[str, Request] = {}
        self.grammar = (GrammarBackend(self.model_dir, self.vocab_size, self.eos_token_ids,
                                       pin_memory=self.device.type == "cuda") if self.tokenizer else None)
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        """Requests whose grammar is compiling (held out of the scheduler until it is done)."""
        self.async_scheduling = config.async_scheduling
        self._inflight: InFlight | None = None
        """The step launched and not yet resolved (asynchronous scheduling)."""
        self.step_timing: dict | None = None
        """Set to {} to accumulate host seconds per step phase (see _phase) and the step count."""
        self.step_phase: str = "idle"
        """The phase the current step is in (read by AsyncEngine's step watchdog from another thread)."""
        self.step_batch: tuple[int, int] = (0, 0)
        """(sequences, tokens) the current or last step computes."""
        self.after_launch: Callable[[], None] | None = None
        """Called in `step` once its forward pass and sampling are launched, before it waits for the device:
        AsyncEngine hands the event loop its deferred work there, so that the loop's Python does not run
        beside (and, holding the GIL, slow) this step's scheduling and input preparation."""
        # What exists now (weights, the block pool's objects, graphs) lives as long as the engine:
        # keep the cyclic collector from walking it again at every collection during steps.
        gc.collect()
        gc.freeze()
        log.info("engine ready: %s on %s (%s), backend %s, KV pool %d tokens (%d blocks x %d, %s)",
                 self.model_dir.name, self.device, str(self.dtype).removeprefix("torch."), self.attention_backend,
                 num_blocks * config.block_size, num_blocks, config.block_size,
                 str(self.runner.kv_dtype).removeprefix("torch."))

    # --- requests --------------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(prompt_token_ids) > self.max_model_len - 1:
            raise ValueError(
                f"prompt: {len(prompt_token_ids)} tokens is more than this model's limit of "
                f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len} includes one output token)")
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; pass token ids")
        return self.tokenizer.encode(prompt)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams | BeamSearchParams
                      ) -> tuple[SamplingParams, BeamSearchParams | None]:
        """Every check add_request makes of a request's prompt ids and parameters (a ValueError naming the field
        and the limit), without queuing it; returns the parameters it runs with: (sampling parameters, the
        beam-search parameters or None)."""
        self.validate_prompt(prompt_token_ids)
        if isinstance(params, SamplingParams) and params.use_beam_search:  # vLLM's extra parameter (gRPC, HTTP)
            params = params.beam_search_params(self.max_model_len - len(prompt_token_ids))
        beam_params = params if isinstance(params, BeamSearchParams) else None
        if beam_params is not None:
            if beam_params.beam_width > self.config.max_num_seqs:
                raise ValueError(f"beam_width: {beam_params.beam_width} is more than this engine's max_num_seqs "
                                 f"({self.config.max_num_seqs})")
            params = sampling_params_for(beam_params)
        if params.n > self.config.max_num_seqs:  # direct gRPC clients bypass the router's max_n
            raise ValueError(f"n: {params.n} is more than this engine's max_num_seqs ({self.config.max_num_seqs}); "
                             "all n samples of a request run in one batch")
        for t in params.logit_bias or {}:
            if t >= self.vocab_size:
                raise ValueError(f"logit_bias: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        if params.structured_outputs is not None:
            if beam_params is not None:
                raise ValueError("structured_outputs: not supported with beam search")
            if self.grammar is None:
                raise ValueError("structured_outputs: this model has no tokenizer to compile a grammar against")
            if params.structured_outputs.resume_tokens >= len(prompt_token_ids):
                raise ValueError("structured_outputs.resume_tokens: must be less than the prompt's length")
        return params, beam_params

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams | BeamSearchParams,
                    prompt_token_ids: list[int] | None = None, stream: bool = True) -> Request:
        """Queue a request. `stream=False`: step() returns its delta only once it finishes (holding
        every token), which spares the host per-token work when nobody reads the tokens as they come."""
        if request_id in self.requests:
            raise ValueError(f"request_id: {quote(request_id)} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: give a prompt or prompt_token_ids")
            prompt_token_ids = self.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        params, beam_params = self.check_request(prompt_token_ids, params)
        req = Request(request_id, prompt, prompt_token_ids, params, stream=stream)
        if params.structured_outputs is not None:
            self._compiling[request_id] = (req, self.grammar.compile(params.structured_outputs))
            self.requests[request_id] = req
            return req
        if beam_params is not None:
            req.beam = BeamSearch(req, beam_params, self.scheduler, self.eos_token_ids, self.max_model_len)
            req.plain = False
        self.scheduler.add(req.seqs[0])
        self.requests[request_id] = req
        return req

    def _admit_compiled(self) -> list[RequestDelta]:
        """Move requests whose grammar has compiled into the scheduler; refuse those whose compile failed
        (or whose resumed tokens the grammar rejects) with an error delta naming the field."""
        deltas = []
        for rid, (req, fut) in list(self._compiling.items()):
            if not fut.done():
                continue
            del self._compiling[rid]
            so = req.params.structured_outputs
            if fut.exception() is not None:
                error = f"{so.field_name}: cannot be compiled: {fut.exception()}"
            else:
                error = self.grammar.attach(req, fut.result())
            if error is not None:
                log.warning("request %s refused: %s", rid, error)
                seq = req.seqs[0]
                seq.status, seq.finish_reason, seq.finish_emitted = SeqStatus.FINISHED, "abort", True
                delta = self._emit(req)
                delta.error = error
                deltas.append(delta)
                continue
            self.scheduler.add(req.seqs[0])
        return deltas

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """Stop a request now and free its blocks. Returns its last delta, or None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.aborted = True
        if self._compiling.pop(request_id, None) is not None:
            req.seqs[0].status, req.seqs[0].finish_reason = SeqStatus.FINISHED, "abort"
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        return self._emit(req)

    def stop_sequences(self, request_id: str, indexes: list[int]) -> None:
        """End some of a request's sequences now, as the caller decided (a stop string its output
        processor found): their blocks are freed and no delta reports them again. The request ends
        once all of its sequences have."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.index in indexes and not seq.finished:
                self.scheduler.finish(seq, "stop")
                seq.finish_emitted = True
        if req.finished:
            self._forget(req)

    def shutdown(self) -> None:
        """Stop the grammar compiler and the tensor-parallel workers, if any, and let what the engine holds
        (weights, KV pool, graphs) be freed once it is dropped: see `release_frozen`."""
        if self.grammar is not None:
            self.grammar.shutdown()
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()
        release_frozen()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineLoad:
        """The engine's load now (`steps` is counted by whoever drives the loop: AsyncEngine)."""
        b = self.blocks
        evictable = b.num_evictable_blocks
        waiting_blocks = sum(-(-seq.num_tokens // b.block_size) for seq in self.scheduler.waiting)
        return EngineLoad(
            total_blocks=b.num_blocks, free_blocks=b.num_free_blocks - evictable, evictable_blocks=evictable,
            waiting_blocks=waiting_blocks, running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, prefix_cache_queries=b.prefix_queries,
            prefix_cache_hits=b.prefix_hits, block_size=b.block_size,
        )

    # --- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Run one scheduling step: schedule -> launch (prepare, forward, sample on the device) ->
        resolve (read the tokens back, update, emit). Returns the deltas of the requests that advanced
        or finished (tokens only: text is the output processor's).

        With asynchronous scheduling (`EngineConfig.async_scheduling`) the step launched here is
        resolved by the next call, after that call has scheduled and launched its own step: the host's
        scheduling and input preparation overlap the device's forward pass, and a sequence's next
        input is read from the device-side tokens of the step before (docs/engine.md)."""
        deltas = self._admit_compiled() if self._compiling else []
        prev, self._inflight = self._inflight, None
        with self._phase("schedule"):
            out = self.scheduler.schedule()
        self.step_batch = (len(out.seqs), out.num_tokens)
        if not out:
            if prev is not None:
                deltas += self._resolve(prev)
            elif self._compiling and not self.scheduler.has_unfinished():  # only compiles pending: wait a little
                concurrent.futures.wait([f for _, f in self._compiling.values()], timeout=0.05,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            if prev is None:
                deltas += self._unblock()
            self._count_step()
            return deltas
        cur, resolved = self._launch(out, prev)
        if self.after_launch is not None:
            self.after_launch()
        if resolved is not None:  # read back early, for a grammar's mask (_launch)
            deltas += resolved
        elif prev is not None:
            deltas += self._resolve(prev, cur if cur.advance_deferred else None)
        if self.async_scheduling and not cur.needs_sync:
            self._inflight = cur
        else:  # the next schedule needs this step's tokens on the host: read them now
            deltas += self._resolve(cur)
        self._count_step()
        return deltas

    def _count_step(self) -> None:
        if self.step_timing is not None:
            self.step_timing["steps"] = self.step_timing.get("steps", 0) + 1

    def _launch(self, out: SchedulerOutput, prev: InFlight | None) -> tuple[InFlight, list | None]:
        """Prepare the inputs, run the forward pass and sample, without reading anything back. A
        sequence whose input is the token `prev` sampled (a placeholder on the host) reads it from
        `prev`'s tokens on the device. When a grammar constrains a row, its mask needs `prev`'s tokens
        on the host: `prev` is resolved once the forward is launched (it runs meanwhile) and before
        sampling; its deltas come back second (else None)."""
        with self._phase("prepare"):
            if out.block_copies:
                self.runner.copy_blocks(out.block_copies)
            carried = prev is not None and prev.rows_are_placeholders and out.seqs is prev.placeholders
            # (A steady step after a steady step: its inputs are the tokens `prev` sampled, row for row.)
            inputs = self.runner.prepare(out, self.blocks, prev.sample.tokens if carried else None)
            if prev is not None and prev.placeholders and not carried:
                fill_pending_inputs(out, inputs, prev)
        with self._phase("forward"):
            logits = self.runner.execute(inputs)
        resolved = None
        if prev is not None and self.grammar is not None and self.grammar.constrains_any(out):
            resolved = self._resolve(prev)
        with self._phase("sample"):
            if out.plain_decode and resolved is None and not (self.grammar is not None and self.grammar.active):
                cur = self._sample_decodes(out, logits, defer_advance=carried)
            else:
                cur = self._sample(out, logits)
                self.scheduler.advance(out, cur.placeholders, time.monotonic())
        return cur, resolved

    def _sample_decodes(self, out: SchedulerOutput, logits: torch.Tensor, defer_advance: bool) -> InFlight:
        """_sample + advance for the steady state, a step of plain decodes only: row i is `out.seqs[i]`'s
        token, and each holds its placeholder; no per-sequence decision is left to make. `defer_advance`:
        the step before decoded these very rows and is resolved next, advancing them (InFlight.advance_deferred)."""
        seqs = out.seqs
        sample = self.sampler.sample(logits, seqs, self.eos_token_ids, distinct=out.batch.params)
        if not defer_advance:
            self.scheduler.advance_decodes(out)
        return InFlight(out, sample, seqs, seqs, [], False, advance_deferred=defer_advance)

    def _resolve(self, f: InFlight, nxt: InFlight | None = None) -> list[RequestDelta]:
        """Read a launched step's tokens back, apply them (stops, forks, beams) and emit the deltas. `nxt`:
        the step launched after `f` over the same rows, its advance deferred to this pass."""
        with self._phase("wait"):
            result = f.sample.result() if f.sample is not None else None
        with self._phase("update"):
            now = time.monotonic()
            if nxt is not None:
                touched = self.scheduler.resolve_steady(f.out, nxt.out, result.token_ids, result.token_array,
                                                        result.logprobs, result.top, now)
            elif result is not None and not f.forks and not f.ended:  # the common step: row by row, at once
                touched = self.scheduler.resolve_rows(f.out, f.seqs, result.token_ids, result.token_array,
                                                      result.logprobs, result.top, now)
            else:
                touched = self.scheduler.resolve(f.out, sampled_by_seq(f, result), now)
            for seq, reason in f.ended.values():  # structured output: a dead end, or complete under min_tokens
                if not seq.finished:
                    self._end_by_grammar(seq, reason)
                    touched[seq.request.request_id] = seq.request
            for req in f.beam_reqs:
                if req.beam.advance():  # beams report once, when the search is over
                    touched[req.request_id] = req
            return [self._emit(req) for req in touched.values() if req.stream or req.aborted or req.finished]

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Add the block's host seconds to step_timing[name] when measuring. Nothing is synchronised:
        time the host spends blocked on the device shows in "wait" (reading a step's tokens back)."""
        self.step_phase = name
        timing = self.step_timing
        if timing is None:
            yield
            return
        t0 = time.perf_counter()
        yield
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> InFlight:
        """The step's rows sampled on the device (inflight.sample_step)."""
        return sample_step(out, logits, self.sampler, self.grammar, self.eos_token_ids)

    def _end_by_grammar(self, seq: Sequence, reason: str) -> None:
        """End `seq` without a new token. A prompt that was to fork into n samples ends as n samples,
        all alike (they share the grammar's state, so each would end the same way)."""
        self.scheduler.finish(seq, reason)
        req = seq.request
        while req.needs_fork:
            req.seqs.append(Sequence(req, len(req.seqs), list(seq.token_ids), seq.num_prompt_tokens,
                                     status=SeqStatus.FINISHED, finish_reason=reason,
                                     num_cached_tokens=seq.num_cached_tokens))

    def _unblock(self) -> list[RequestDelta]:
        """Nothing could be scheduled. If nothing runs, the head of the queue can never fit in the
        pool: end it (finish reason "length") rather than spin."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        self.scheduler.finish(seq, "length")
        return [self._emit(seq.request)]

    def _emit(self, req: Request) -> RequestDelta:
        """What `req` produced since its last delta (engine_outputs.request_delta); forgets it once it has finished."""
        delta = request_delta(req)
        if delta.finished:
            self._forget(req)
        return delta

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        if self.grammar is not None:
            self.grammar.forget(req)
        for seq in req.seqs:
            self.sampler.forget(seq)
