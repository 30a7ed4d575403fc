"""The engine loop: add requests, step (schedule -> forward -> sample -> stop checks), stream outputs.

`LLMEngine` is synchronous and single-threaded; the offline `LLM` drives it in a loop and the gRPC
engine service drives it from a background thread. Requests are validated here so both paths give
the same errors.
"""

from __future__ import annotations

import logging
import time

import torch

from services.common.engine_load import EngineLoad
from services.common.tokenizer import IncrementalDetokenizer, Tokenizer
from services.engine.attention import default_backend
from services.engine.beam_search import BeamSearch, sampling_params_for
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.common.errors import quote
from services.common.model_location import resolve_model_path
from services.engine.model.loader import read_config, resolve_dtype
from services.engine.model_runner import ModelRunner, kv_bytes_per_block
from services.engine.request import Request, Sequence, SeqStatus
from services.engine.sampler import Sampler
from services.common.sampling_params import BeamSearchParams, SamplingParams
from services.common.outputs import CompletionOutput, Logprob, RequestOutput
from services.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig

log = logging.getLogger("folio.engine")

__all__ = ["EngineConfig", "LLMEngine", "QueueFullError"]


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
        backend = config.attention_backend or default_backend(str(self.device))
        if config.seed is not None:
            torch.manual_seed(config.seed)
        if config.tensor_parallel_size > 1:  # rank 0 of a group of processes (services/engine/parallel.py)
            from services.engine.parallel import TensorParallelRunner

            self.runner = TensorParallelRunner(self.model_dir, self.hf_config, self.dtype, self.device, backend,
                                               config.block_size, config.load_format, config.tensor_parallel_size,
                                               config.seed)
        else:
            self.runner = ModelRunner(self.model_dir, self.hf_config, self.dtype, self.device, backend,
                                      config.block_size, config.load_format)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give loading's transient copies back before sizing the KV pool
        mcfg = self.runner.cfg
        self.vocab_size = mcfg.vocab_size
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's context length ({mcfg.max_position_embeddings})")
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        num_blocks = self._size_kv_pool()
        capacity = num_blocks * config.block_size
        if capacity < self.max_model_len and config.max_model_len is None:
            # Not asked for explicitly: fit the context limit to the pool rather than refuse to start.
            log.warning("max_model_len lowered from %d to %d to fit the KV pool", self.max_model_len, capacity)
            self.max_model_len = capacity
        if capacity < self.max_model_len:
            raise ValueError(
                f"num_kv_blocks: {num_blocks} blocks of {config.block_size} tokens cannot hold one sequence of "
                f"max_model_len {self.max_model_len}; give more KV memory or a smaller max_model_len")
        self.runner.allocate_kv_cache(num_blocks)
        if self.device.type == "cuda":
            self.runner.warmup(self.max_model_len)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(min(config.max_num_seqs, self.max_num_batched_tokens), self.max_model_len)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                   sliding_window=self.runner.model.kv_sliding_window)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, self.max_num_batched_tokens, config.max_waiting_requests), self.blocks)
        self.sampler = Sampler(self.device, config.seed or 0)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else self._eos_from_config()
        self.requests: dict[str, Request] = {}
        self.step_timing: dict | None = None
        """Set to {} to accumulate seconds per step phase (adds a GPU sync per step: measurement only)."""
        self.attention_backend = backend
        log.info("engine ready: %s on %s (%s), backend %s, %d KV blocks x %d tokens",
                 self.model_dir.name, self.device, str(self.dtype).removeprefix("torch."), backend,
                 num_blocks, config.block_size)

    def _eos_from_config(self) -> frozenset[int]:
        e = self.hf_config.get("eos_token_id")
        return frozenset(e if isinstance(e, list) else ([e] if e is not None else []))

    def _size_kv_pool(self) -> int:
        c = self.config
        # Per rank: each holds 1/tensor_parallel_size of the KV heads (and of the pool's bytes).
        per_block = kv_bytes_per_block(self.runner.cfg, c.block_size, self.dtype) // c.tensor_parallel_size
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, c.cpu_kv_cache_bytes // per_block)
        free, total = torch.cuda.mem_get_info(self.device)
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

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams | BeamSearchParams,
                    prompt_token_ids: list[int] | None = None) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id: {quote(request_id)} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: give a prompt or prompt_token_ids")
            prompt_token_ids = self.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        self.validate_prompt(prompt_token_ids)
        beam_params = params if isinstance(params, BeamSearchParams) else None
        if beam_params is not None:
            params = sampling_params_for(beam_params)
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        req = Request(request_id, prompt, prompt_token_ids, params)
        if beam_params is not None:
            req.beam = BeamSearch(req, beam_params, self.scheduler, self.eos_token_ids, self.max_model_len, self.tokenizer)
        self._init_seq(req.seqs[0])
        self.scheduler.add(req.seqs[0])
        self.requests[request_id] = req
        return req

    def _init_seq(self, seq: Sequence) -> None:
        if seq.params.logprobs is not None:
            seq.logprobs = []
        if self.tokenizer is not None and seq.params.stop:
            # Stop strings need the text as it grows; otherwise the text is decoded once, at the end.
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks. Returns its last output, or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
            self.sampler.forget(seq.seq_id)
        return self._output(req)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (a one-process engine holds nothing to release)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

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
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of the requests that advanced or finished
        (only of those that finished when `stream` is False: the offline API needs no more)."""
        timing = self.step_timing
        t0 = time.perf_counter() if timing is not None else 0.0
        out = self.scheduler.schedule()
        if not out:
            return self._unblock()
        if timing is not None:
            t1 = time.perf_counter()
        tables = [self.blocks.block_ids(s.seq.seq_id) for s in out.scheduled]
        if out.block_copies:
            self.runner.copy_blocks(out.block_copies)
        inputs = self.runner.prepare(out, tables)
        if timing is not None:
            t2 = time.perf_counter()
        logits = self.runner.execute(inputs)
        if timing is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # only when measuring: attribute GPU time to the forward
            t3 = time.perf_counter()
        now = time.monotonic()

        self.scheduler.after_step(out)  # advance num_computed_tokens (forks below copy it)

        to_sample: list[Sequence] = []
        sample_rows: list[int] = []
        beam_reqs: dict[str, Request] = {}
        row = 0
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            req = seq.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            start = seq.num_computed_tokens - n
            caught_up = seq.num_computed_tokens == seq.num_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                self._record_prompt_logprobs(req, logits[row:row + n], start)
                row += n
                last = row - 1
            elif caught_up:
                last = row
                row += 1
            if caught_up and req.beam is not None:  # beam search picks the tokens (beam_search.py)
                req.beam.add_logits(seq, logits[last])
                beam_reqs[req.request_id] = req
            elif caught_up:
                to_sample.append(seq)
                sample_rows.append(last)
                if req.needs_fork:  # n > 1: the prompt is computed once, then shared by n sequences
                    for child in self._fork(req, seq):
                        to_sample.append(child)
                        sample_rows.append(last)

        touched: dict[str, Request] = {}
        if to_sample:
            if sample_rows != list(range(logits.shape[0])):  # decode-only steps sample every row as is
                logits = logits[torch.tensor(sample_rows, device=logits.device)]
            result = self.sampler(logits, to_sample, self.eos_token_ids)
            for i, seq in enumerate(to_sample):
                self._append_token(seq, result.token_ids[i], result.logprobs[i], result.top[i])
                if seq.request.first_token_time is None:
                    seq.request.first_token_time = now
                touched[seq.request.request_id] = seq.request
        for req in beam_reqs.values():
            if req.beam.advance():  # beams report once, when the search is over
                touched[req.request_id] = req
        if timing is not None:
            t4 = time.perf_counter()
            for k, v in (("schedule", t1 - t0), ("prepare", t2 - t1), ("forward", t3 - t2), ("sample_update", t4 - t3)):
                timing[k] = timing.get(k, 0.0) + v
            timing["steps"] = timing.get("steps", 0) + 1
        outputs = []
        for req in touched.values():
            finished = req.finished
            if stream or finished:
                outputs.append(self._output(req))
            if finished:
                self.requests.pop(req.request_id, None)
                for seq in req.seqs:
                    self.sampler.forget(seq.seq_id)
        return outputs

    def _unblock(self) -> list[RequestOutput]:
        """Nothing could be scheduled. If nothing runs, the head of the queue can never fit in the
        pool: end it (finish reason "length") rather than spin."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        self._finish(seq, "length")
        req = seq.request
        outputs = [self._output(req)]
        if req.finished:
            self.requests.pop(req.request_id, None)
        return outputs

    def _fork(self, req: Request, parent: Sequence) -> list[Sequence]:
        children = []
        while req.needs_fork:
            child = Sequence(req, len(req.seqs), list(parent.token_ids), parent.num_prompt_tokens,
                             num_computed_tokens=parent.num_computed_tokens)
            child.num_cached_tokens = parent.num_cached_tokens
            self._init_seq(child)
            self.blocks.fork(parent, child)
            self.scheduler.add_running(child, after=children[-1] if children else parent)
            req.seqs.append(child)
            children.append(child)
        return children

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
            entry = {tok: Logprob(row[tok].item(), int((row > row[tok]).sum().item()) + 1, self._tok_text(tok))}
            if k:
                vals, ids = row.topk(k)
                for r, (t, v) in enumerate(zip(ids.tolist(), vals.tolist())):
                    entry.setdefault(t, Logprob(v, r + 1, self._tok_text(t)))
            req.prompt_logprobs.append(entry)

    def _tok_text(self, token_id: int) -> str | None:
        return self.tokenizer.decode_token(token_id) if self.tokenizer else None

    def _append_token(self, seq: Sequence, token: int, logprob: float, top) -> None:
        p = seq.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None and top is not None:
            ids, lps, rank = top
            entry = {token: Logprob(logprob, rank, self._tok_text(token))}
            for r, (t, v) in enumerate(zip(ids, lps)):
                entry.setdefault(t, Logprob(v, r + 1, self._tok_text(t)))
            seq.logprobs.append(entry)
        n_out = seq.num_output_tokens
        reason, stop = None, None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop = "stop", token
        if seq.detok is not None:
            delta = seq.detok.add([token])
            seq.text = seq.detok.text
            if reason is None and p.stop and n_out >= p.min_tokens and delta:
                hit = p.find_stop(seq.text, len(delta))
                if hit is not None:
                    idx, s = hit
                    seq.text = seq.text[:idx + len(s)] if p.include_stop_str_in_output else seq.text[:idx]
                    reason, stop = "stop", s
        if reason is None and ((p.max_tokens is not None and n_out >= p.max_tokens)
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, stop)

    def _finish(self, seq: Sequence, reason: str, stop: int | str | None = None) -> None:
        """End a sequence: settle its text, free its blocks."""
        seq.finish_reason, seq.stop_reason = reason, stop
        if seq.detok is not None:
            if not isinstance(stop, str):  # a stop string already cut the text
                seq.text += seq.detok.flush()
        elif self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            )
            for s in req.seqs
        ]
        finished = req.aborted or req.finished
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=req.prompt_logprobs, outputs=outs, finished=finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            metrics={"arrival_time": req.arrival_time, "first_scheduled_time": req.first_scheduled_time,
                     "first_token_time": req.first_token_time},
        )
