"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import collections
import itertools
import weakref
from collections.abc import Sequence as Seq

from services.common.errors import InvalidArgument
from services.common.output_processor import OutputProcessor
from services.common.outputs import RequestOutput
from services.common.sampling_params import BeamSearchParams, SamplingParams
from services.engine.beam_search import sampling_params_for
from services.engine.engine import EngineConfig, LLMEngine, release_frozen

PromptType = str | list[int] | dict


class LLM:
    """An engine in this process. Options are EngineConfig's fields (model, dtype, device, block_size,
    max_model_len, max_num_seqs, max_num_batched_tokens, num_kv_blocks, gpu_memory_utilization,
    cpu_kv_cache_bytes, kv_cache_dtype, seed, attention_backend, enable_prefix_caching, tensor_parallel_size).
    With tensor_parallel_size > 1 this process is rank 0 and starts one worker process per other rank;
    `shutdown()` stops them (they are also stopped when the LLM is dropped or the process exits)."""

    def __init__(self, model: str | None = None, **kwargs):
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"LLM() got unknown options {sorted(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()
        # Dropping the LLM (without shutdown) must free the engine's memory too (engine.release_frozen).
        weakref.finalize(self, release_frozen)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string, a list of token ids, or
        {"prompt": str} / {"prompt_token_ids": [...]}. Every prompt is checked before any runs."""
        items = self._prompt_items(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(items) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(items):
            raise ValueError(f"sampling_params: got {len(params)} for {len(items)} prompts")
        return self._run([(t, ids, sp) for (t, ids), sp in zip(items, params)], use_tqdm)

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt whose `outputs` are its beams, best first (each with token_ids,
        text and cumulative_logprob). The beams share the prompt's KV blocks; see beam_search.py."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params: expected BeamSearchParams, got {type(params).__name__}")
        return self._run([(t, ids, params) for t, ids in self._prompt_items(prompts)], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("messages: this model has no tokenizer")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": tok.encode_chat(c, add_generation_prompt),
                    "prompt": tok.apply_chat_template(c, add_generation_prompt)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _prompt_items(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return [self._to_ids(p) for p in prompts]

    def _to_ids(self, p: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(p, str):
            return p, self.engine.encode(p)
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                return p.get("prompt"), list(p["prompt_token_ids"])
            if "prompt" in p:
                return p["prompt"], self.engine.encode(p["prompt"])
            raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(p, (list, tuple)):
            return None, list(p)
        raise ValueError(f"prompt: expected a string, token ids or a dict, got {type(p).__name__}")

    def _feed(self, queue: collections.deque, proc: OutputProcessor) -> None:
        """Queue requests in the engine only as far ahead as its next schedule can tell (Scheduler.queue_shortfall):
        the step it makes is the one it would make with every request queued, and the rest are queued between
        steps, while the device computes (with asynchronous scheduling). On the H200's host the first step of
        1,024 requests still waited as long as before (~19-30 ms: the up-front checks and prompt copies,
        docs/engine.md "One step")."""
        engine = self.engine
        seqs, tokens = engine.scheduler.queue_shortfall()
        while queue and ((seqs > 0 and (tokens is None or tokens > 0)) or not engine.scheduler.waiting):
            rid, (text, ids, sp) = queue.popleft()
            text_params = sampling_params_for(sp) if isinstance(sp, BeamSearchParams) else sp
            # Only stop strings need the text as it grows (to end a sequence early); other requests
            # come back from the engine once, finished, with no per-token work on the host.
            engine.add_request(rid, text, sp, prompt_token_ids=ids, stream=bool(text_params.stop))
            proc.add_request(rid, text, ids, text_params)
            seqs -= 1
            if tokens is not None:
                tokens -= len(ids)

    def _run(self, items, use_tqdm: bool) -> list[RequestOutput]:
        """Drive the engine until every request is done; the output processor turns its token deltas
        into RequestOutputs (text, stop strings) and says which sequences a stop string ended, which
        the engine then stops before its next step."""
        engine = self.engine
        for _, ids, sp in items:  # every request is checked before any runs (a ValueError naming the field)
            engine.check_request(ids, sp)
        proc = OutputProcessor(engine.tokenizer)
        order = [f"offline-{next(self._ids)}" for _ in items]
        queue = collections.deque(zip(order, items))
        results = {}
        bar = None
        if use_tqdm and len(items) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc="Processed prompts", dynamic_ncols=True)
        try:
            while len(results) < len(order):
                if queue:
                    self._feed(queue, proc)
                for delta in engine.step():
                    if delta.error is not None:  # bad input found once queued (a grammar that did not compile)
                        raise InvalidArgument(delta.error)
                    out, stopped = proc.process(delta)
                    if stopped:
                        engine.stop_sequences(delta.request_id, stopped)
                    if out is not None and out.finished and out.request_id not in results:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in order:  # leave the engine clean for the next call (an id never queued is ignored)
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in order]
