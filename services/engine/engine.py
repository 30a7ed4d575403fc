"""The engine loop: add requests, step (schedule -> execute -> sample -> update -> emit), emit token deltas.

`LLMEngine` is synchronous and single-threaded; the offline `LLM` drives it in a loop and the gRPC
engine service drives it from a background thread. It speaks tokens only: it stops on EOS, stop
token ids, min/max tokens and the context length, and each step emits per-sequence deltas (new token
ids, logprobs, finish reasons). Text and stop strings belong to services/common/output_processor.py.
Requests are validated here so both paths give the same errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import concurrent.futures
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from services.common.engine_load import EngineLoad
from services.common.tokenizer import Tokenizer
from services.engine.attention import default_backend
from services.engine.beam_search import BeamSearch, sampling_params_for
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.common.errors import quote
from services.common.model_location import resolve_model_path
from services.engine.model.loader import read_config, resolve_dtype
from services.engine.model_runner import ModelRunner, kv_bytes_per_block
from services.engine.request import Request, SampledToken, Sequence
from services.engine.sampler import DeviceSample, Sampler, device_tensor
from services.engine.request import SeqStatus
from services.engine.structured import GrammarBackend
from services.common.sampling_params import BeamSearchParams, SamplingParams
from services.common.outputs import Logprob, RequestDelta, SequenceDelta
from services.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput

log = logging.getLogger("folio.engine")


@dataclasses.dataclass
class _InFlight:
    """A launched step whose sampled tokens have not been read back yet."""

    out: SchedulerOutput
    sample: DeviceSample | None
    seqs: list
    """The sequence of each sampled row (a prompt forking into n samples appears n times)."""
    placeholders: list
    """Sequences holding a placeholder for this step's token (each knows its row: `pending_row`)."""
    beam_reqs: list
    needs_sync: bool
    """The next schedule needs these tokens on the host (forks, beams, grammars, penalties)."""
    ended: dict = dataclasses.field(default_factory=dict)
    """seq_id -> (sequence, finish reason): rows the grammar ends instead of sampling (GrammarBackend.fill)."""
    forks: bool = False
    """Some prompt forks into its n samples in this step (its rows repeat one sequence)."""
    advance_deferred: bool = False
    """A steady step whose rows are those of the step before it: launched without advancing its
    sequences; resolving the step before advances them in the same pass (Scheduler.resolve_steady)."""

    @property
    def rows_are_placeholders(self) -> bool:
        """Row i of the sampled tokens is `placeholders[i]`'s token, for every row (nothing forks or ends)."""
        return self.placeholders is self.seqs

__all__ = ["EngineConfig", "LLMEngine", "QueueFullError"]


def release_frozen() -> None:
    """Hand the objects frozen at an engine's start back to the cyclic collector. The engine calls
    `gc.freeze()` once built, so collections during steps skip its long-lived objects; but frozen objects
    in reference cycles are never collected, so a dropped engine's weights and KV pool (gigabytes of
    device memory) would stay allocated for the life of the process. Called at shutdown and when an
    offline `LLM` is dropped; the next collection frees whatever is no longer referenced."""
    gc.unfreeze()


class LLMEngine:
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
        self.runner = self._load_runner()
        self.vocab_size = self.runner.cfg.vocab_size
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        num_blocks = self._fit_kv_pool()
        self._prepare_runner(num_blocks)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                   sliding_window=self.runner.model.kv_sliding_window)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else self._eos_from_config()
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
        self._inflight: _InFlight | None = None
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

    def _load_runner(self):
        """The model on its device(s): one ModelRunner, or rank 0 of a tensor-parallel group of processes
        (services/engine/parallel.py)."""
        c = self.config
        if c.tensor_parallel_size > 1:
            from services.engine.parallel import TensorParallelRunner

            runner = TensorParallelRunner(self.model_dir, self.hf_config, self.dtype, self.device,
                                          self.attention_backend, c.block_size, c.load_format, c.tensor_parallel_size,
                                          c.seed, c.tp_collective_timeout_s, c.kv_cache_dtype,
                                          quantization=c.quantization)
        else:
            runner = ModelRunner(self.model_dir, self.hf_config, self.dtype, self.device, self.attention_backend,
                                 c.block_size, c.load_format, kv_cache_dtype=c.kv_cache_dtype,
                                 quantization=c.quantization)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give loading's transient copies back before sizing the KV pool
        return runner

    def _fit_kv_pool(self) -> int:
        """Size the KV pool (in blocks) and settle `max_model_len` against it and the model's context."""
        c, context = self.config, self.runner.cfg.max_position_embeddings
        self.max_model_len = c.max_model_len or context
        if self.max_model_len > context:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's context length ({context})")
        num_blocks = self._size_kv_pool()
        capacity = num_blocks * c.block_size
        if capacity < self.max_model_len and c.max_model_len is None:
            # Not asked for explicitly: fit the context limit to the pool rather than refuse to start.
            log.warning("max_model_len lowered from %d to %d to fit the KV pool", self.max_model_len, capacity)
            self.max_model_len = capacity
        if capacity < self.max_model_len:
            raise ValueError(
                f"num_kv_blocks: {num_blocks} blocks of {c.block_size} tokens cannot hold one sequence of "
                f"max_model_len {self.max_model_len}; give more KV memory or a smaller max_model_len")
        return num_blocks

    def _prepare_runner(self, num_blocks: int) -> None:
        """Allocate the KV pool; on CUDA compile every kernel (warm-up) and capture the step graphs."""
        c = self.config
        self.runner.allocate_kv_cache(num_blocks)
        if self.device.type != "cuda":
            return
        self.runner.warmup(self.max_model_len, c.max_num_seqs, self.max_num_batched_tokens)
        if not c.enforce_eager:
            self.runner.capture_decode_graphs(min(c.max_num_seqs, self.max_num_batched_tokens), self.max_model_len)
            if c.mixed_cuda_graphs:
                self.runner.capture_mixed_graphs(min(c.max_mixed_graph_tokens, self.max_num_batched_tokens),
                                                 c.max_num_seqs, self.max_model_len)

    def _eos_from_config(self) -> frozenset[int]:
        e = self.hf_config.get("eos_token_id")
        return frozenset(e if isinstance(e, list) else ([e] if e is not None else []))

    def _size_kv_pool(self) -> int:
        c = self.config
        # Per rank: each holds 1/tensor_parallel_size of the KV heads (and of the pool's bytes).
        per_block = kv_bytes_per_block(self.runner.cfg, c.block_size, self.runner.kv_dtype) // c.tensor_parallel_size
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, c.cpu_kv_cache_bytes // per_block)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory torch's allocator holds but no tensor uses (an earlier engine in this process, load-time
        # temporaries) is free for the pool: cudaMemGetInfo counts it as used.
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        used_now = total - free  # weights and anything else already resident
        m = self.runner.cfg
        # Activations of the largest step: hidden states, fused qkv and gate/up, logits, in float32 at worst.
        act = self.max_num_batched_tokens * (4 * m.hidden_size + 2 * m.intermediate_size
                                             + (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim) * 4
        act += c.max_num_seqs * m.vocab_size * 4 * 4
        budget = int(total * c.gpu_memory_utilization) - used_now - act - (512 << 20)
        if budget < per_block:
            raise ValueError(f"gpu_memory_utilization {c.gpu_memory_utilization}: no GPU memory left for the KV pool")
        n = budget // per_block
        log.info("KV pool: %.2f GiB (%d blocks); weights %.2f GiB", n * per_block / 2**30, n,
                 self.runner.weight_bytes() / 2**30)
        return n

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

    def _launch(self, out: SchedulerOutput, prev: "_InFlight | None") -> tuple["_InFlight", list | None]:
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
                self._fill_pending_inputs(out, inputs, prev)
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

    def _sample_decodes(self, out: SchedulerOutput, logits: torch.Tensor, defer_advance: bool) -> "_InFlight":
        """_sample + advance for the steady state, a step of plain decodes only: row i is `out.seqs[i]`'s
        token, and each holds its placeholder; no per-sequence decision is left to make. `defer_advance`:
        the step before decoded these very rows and is resolved next, advancing them (_InFlight.advance_deferred)."""
        seqs = out.seqs
        sample = self.sampler.sample(logits, seqs, self.eos_token_ids, distinct=out.batch.params)
        if not defer_advance:
            self.scheduler.advance_decodes(out)
        return _InFlight(out, sample, seqs, seqs, [], False, advance_deferred=defer_advance)

    def _fill_pending_inputs(self, out: SchedulerOutput, inputs, prev: "_InFlight") -> None:
        """Input positions holding a placeholder take the token `prev` sampled, on the device. Such a
        sequence was caught up, so its one new token is its placeholder (its first input position);
        `Sequence.pending_row` is its row of `prev`'s tokens."""
        tokens = prev.sample.tokens
        if (prev.rows_are_placeholders and out.num_tokens == len(out.seqs) == tokens.shape[0]
                and out.seqs == prev.placeholders):  # the same decode batch as before, in order
            inputs.input_ids.copy_(tokens)
            return
        dst, src, off = [], [], 0
        for s in out.scheduled:
            seq = s.seq
            if seq.num_pending:
                dst.append(off)
                src.append(seq.pending_row)
            off += s.num_new_tokens
        if not dst:
            return
        if len(dst) == off == tokens.shape[0] and dst == src:  # every row in place
            inputs.input_ids.copy_(tokens)
            return
        idx = device_tensor([dst, src], inputs.input_ids.device, torch.long)
        inputs.input_ids[idx[0]] = tokens[idx[1]]

    def _resolve(self, f: "_InFlight", nxt: "_InFlight | None" = None) -> list[RequestDelta]:
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
                touched = self.scheduler.resolve(f.out, self._sampled_by_seq(f, result), now)
            for seq, reason in f.ended.values():  # structured output: a dead end, or complete under min_tokens
                if not seq.finished:
                    self._end_by_grammar(seq, reason)
                    touched[seq.request.request_id] = seq.request
            for req in f.beam_reqs:
                if req.beam.advance():  # beams report once, when the search is over
                    touched[req.request_id] = req
            return [self._emit(req) for req in touched.values() if req.stream or req.aborted or req.finished]

    @staticmethod
    def _sampled_by_seq(f: "_InFlight", result) -> dict[int, list[SampledToken]]:
        """seq_id -> its sampled tokens (n of them for a prompt forking into n samples), rows the
        grammar ended left out."""
        sampled: dict[int, list[SampledToken]] = {}
        if result is None:
            return sampled
        ended = f.ended
        top = result.top or [None] * len(f.seqs)
        for seq, tok, lp, t in zip(f.seqs, result.token_ids, result.logprobs, top):
            if ended and seq.seq_id in ended:
                continue
            sampled.setdefault(seq.seq_id, []).append(SampledToken(tok, lp, t))
        return sampled

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

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> "_InFlight":
        """Record prompt logprobs, feed beams their rows and sample the rest, reading the rows the
        scheduler assigned. A request whose prompt just completed samples all n of its sequences
        from its row (the scheduler forks the siblings when it resolves them). A row whose grammar
        ends its sequence instead (GrammarBackend.fill) is sampled with the rest and its token dropped."""
        seqs, rows = [], []
        fork_index: dict[int, int] = {}  # row -> sample index, for the n rows of a prompt forking now
        beam_reqs: dict[str, Request] = {}
        ended: dict[int, tuple] = {}
        needs_sync = False
        finished = SeqStatus.FINISHED
        for s in out.scheduled:
            row = s.sample_row
            if s.prompt_logprob_rows:
                r = s.prompt_logprob_rows
                self._record_prompt_logprobs(s.seq.request, logits[r.start:r.stop].float(),
                                             s.seq.num_computed_tokens)
            if row is None:
                continue
            seq = s.seq
            if seq.status is finished:  # (by the step before, resolved early in _launch)
                continue
            req = seq.request
            if req.plain:  # one sequence, no beam, no penalties: the common row
                seq.pending_row = len(seqs)
                seqs.append(seq)
                rows.append(row)
                continue
            if req.beam is not None:  # beam search picks the tokens (beam_search.py)
                req.beam.add_logits(seq, logits[row].float())
                beam_reqs[req.request_id] = req
                needs_sync = True
                continue
            params = req.params
            needs_sync = needs_sync or params.has_penalties  # penalties read the output ids on the host
            forks = params.n - len(req.seqs)
            if forks:
                needs_sync = True  # the siblings are forked on the host once the token is read
                for i in range(seq.index, seq.index + 1 + forks):
                    fork_index[len(seqs)] = i
                    seqs.append(seq)
                    rows.append(row)
                continue
            seq.pending_row = len(seqs)
            seqs.append(seq)
            rows.append(row)
        placeholders = seqs if not fork_index else [seq for i, seq in enumerate(seqs) if i not in fork_index]
        sample = None
        if seqs:
            if rows != list(range(logits.shape[0])):  # decode-only steps sample every row as is
                logits = logits[device_tensor(rows, logits.device)]
            bitmask, end_rows = (self.grammar.fill(seqs) if self.grammar is not None and self.grammar.active
                                 else (None, {}))
            # The next step reads this token back before its masks (_launch); a sequence the grammar
            # ends now holds no placeholder, so the next schedule must see it finished.
            needs_sync = needs_sync or bool(end_rows)
            indexes = [fork_index.get(i, seq.index) for i, seq in enumerate(seqs)] if fork_index else None
            sample = self.sampler.sample(logits, seqs, self.eos_token_ids, indexes, bitmask)
            if end_rows:  # they end without a token: no placeholder for one (their rows' samples are dropped)
                for i in end_rows:
                    ended[seqs[i].seq_id] = (seqs[i], end_rows[i])
                placeholders = [seq for seq in placeholders if seq.seq_id not in ended]
        return _InFlight(out, sample, seqs, placeholders, list(beam_reqs.values()), needs_sync, ended,
                         forks=bool(fork_index))

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

    def _record_prompt_logprobs(self, req: Request, chunk_logits: torch.Tensor, start: int) -> None:
        seq = req.seqs[0]
        k = seq.params.prompt_logprobs
        lp = torch.log_softmax(chunk_logits, dim=-1)
        n_prompt = seq.num_prompt_tokens
        for j in range(chunk_logits.shape[0]):
            p = start + j + 1  # the logits at position p-1 predict token p
            if p >= n_prompt or len(req.prompt_logprobs) != p:
                continue  # past the prompt, or already recorded before a preemption
            tok = seq.token_ids[p]
            row = lp[j]
            entry = {tok: Logprob(row[tok].item(), int((row > row[tok]).sum().item()) + 1)}
            if k:
                vals, ids = row.topk(k)
                for r, (t, v) in enumerate(zip(ids.tolist(), vals.tolist())):
                    entry.setdefault(t, Logprob(v, r + 1))
            req.prompt_logprobs.append(entry)

    def _emit(self, req: Request) -> RequestDelta:
        """What `req` produced since its last delta: new tokens and logprobs per sequence, finish
        reasons once, prompt logprobs once. Forgets the request once it has finished."""
        seqs = []
        for s in req.seqs:
            n_out = s.num_resolved_output_tokens  # a placeholder in flight is not a token yet
            new = n_out - s.num_emitted_tokens
            report_finish = s.finish_reason is not None and not s.finish_emitted
            if new <= 0 and not report_finish:
                continue
            first = s.num_prompt_tokens + s.num_emitted_tokens
            seqs.append(SequenceDelta(
                index=s.index, token_ids=s.token_ids[first:s.num_prompt_tokens + n_out], cumulative_logprob=s.cumulative_logprob,
                logprobs=None if s.logprobs is None else s.logprobs[s.num_emitted_tokens:n_out],
                finish_reason=s.finish_reason if report_finish else None,
                stop_token_id=s.stop_reason if report_finish else None))
            s.num_emitted_tokens = n_out
            s.finish_emitted = s.finish_emitted or report_finish
        finished = req.aborted or req.finished
        prompt_lps = None
        if req.prompt_logprobs is not None and seqs and not req.prompt_logprobs_emitted:
            prompt_lps, req.prompt_logprobs_emitted = req.prompt_logprobs, True
        if finished:
            self._forget(req)
        return RequestDelta(request_id=req.request_id, sequences=seqs, finished=finished, prompt_logprobs=prompt_lps,
                            num_cached_tokens=req.seqs[0].num_cached_tokens, arrival_time=req.arrival_time,
                            first_scheduled_time=req.first_scheduled_time, first_token_time=req.first_token_time)

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        if self.grammar is not None:
            self.grammar.forget(req)
        for seq in req.seqs:
            self.sampler.forget(seq)
