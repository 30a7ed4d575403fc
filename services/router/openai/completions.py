"""POST /v1/completions: prompts (strings or token ids, one or many) -> one generation each, merged
into one JSON body or one event stream (choice index = prompt × n + i); `echo` and legacy logprobs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from services.common.errors import InvalidArgument
from services.common.sampling_params import SamplingParams
from services.router.core import ChoiceDelta, Chunk, GenerateInput, RouterCore
from services.router.metrics import RouterMetrics
from services.router.openai.errors import from_exception
from services.router.openai.logprobs import completion_logprobs
from services.router.openai.protocol import CompletionRequest
from services.router.openai.run import EventStream, Run, cancel_on_disconnect
from services.router.openai.serving import Collected, sampling_params, sse, stop_reason, usage


class Completions:
    def __init__(self, core: RouterCore, metrics: RouterMetrics, request_timeout_s: float | None):
        self.core = core
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        job = await self._prepare(req)
        run = Run(self.core, self.metrics, job.inputs(self.request_timeout_s))
        if req.stream:
            job.stamps = raw.scope.get("folio.stamps")  # with the timing header (app.py: TIMING_HEADER)
            return EventStream(run, job.events(run))
        collected = await cancel_on_disconnect(raw, Collected.of(run, job.params.n, len(job.encoded)), run)
        return JSONResponse(await job.body(collected))

    async def _prepare(self, req: CompletionRequest) -> _Completion:
        """Validate, build the params, tokenize each prompt and check it against the context limit."""
        if req.suffix is not None:
            raise InvalidArgument("suffix: not supported")
        limits = self.core.limits  # sizes first: nothing below is built per choice or per prompt before this
        limits.check_n(req.n)
        limits.check_n(req.best_of, "best_of")
        limits.check_logprobs(req.logprobs, "logprobs")
        limits.check_stop(req.stop)
        if req.best_of is not None and req.best_of != req.n and not req.use_beam_search:
            raise InvalidArgument(f"best_of: only best_of == n is supported without use_beam_search "
                                  f"(got best_of={req.best_of}, n={req.n})")
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        limits.check_choices(req.n, len(prompts))
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidArgument("prompt: must not be empty")
        echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        score_only = req.max_tokens == 0  # prompt scoring: the prompt's logprobs, nothing generated
        if score_only and not req.echo:
            raise InvalidArgument("max_tokens: 0 is only allowed with echo (prompt scoring)")
        # The engine generates at least one token: a scoring request asks for one and drops it.
        params = sampling_params(req, 1 if score_only else req.max_tokens, req.logprobs, prompt_logprobs=echo_lp)
        limits.check_params(params)
        model = self.core.resolve_model(req.model)
        limits.check_max_tokens(params.max_tokens, self.core.max_model_len(model))
        if all(isinstance(p, list) for p in prompts):  # token ids: nothing to wait for (gather's tasks cost a loop turn)
            encoded = [list(p) for p in prompts]
        else:
            encoded = await asyncio.gather(*[self._encode(model, p, params, req.add_special_tokens) for p in prompts])
        for ids in encoded:
            self.core.check_context(model, len(ids), params.max_tokens, "prompt")
        echo_texts = None
        if req.echo:
            echo_texts = [p if isinstance(p, str) else await self.core.decode(model, ids, skip_special_tokens=False)
                          for p, ids in zip(prompts, encoded)]
        return _Completion(self.core, req, params, model, f"cmpl-{uuid.uuid4().hex}", int(time.time()), encoded,
                           echo_texts, score_only)

    async def _encode(self, model: str, prompt, params: SamplingParams, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            _, ids = await self.core.encode(GenerateInput(params=params, model=model, prompt=prompt,
                                                          add_special_tokens=add_special_tokens))
            return ids
        return list(prompt)


@dataclass
class _Completion:
    """One completions request, prepared: what its body or events are made from."""

    core: RouterCore
    req: CompletionRequest
    params: SamplingParams
    model: str
    rid: str
    created: int
    encoded: list[list[int]]
    echo_texts: list[str] | None
    score_only: bool = False
    """max_tokens 0 with echo: the one token generated is dropped (text, logprobs, usage)."""
    stamps: list[tuple[str, int]] | None = None
    """The HTTP side's first-token stamps when the client asked for timing (app.py: TIMING_HEADER)."""

    def inputs(self, timeout_s: float | None) -> list[GenerateInput]:
        return [GenerateInput(params=self.params, model=self.model, prompt_token_ids=ids, request_id=f"{self.rid}-{i}",
                              timeout_s=timeout_s) for i, ids in enumerate(self.encoded)]

    def echoed(self, p: int, text: str, token_ids: list[int], entries: list, prompt_logprobs) -> tuple:
        """With `echo`, the prompt goes first: its text, and with logprobs its tokens and their logprobs."""
        if self.echo_texts is None:
            return text, token_ids, entries
        if self.score_only:
            text, token_ids, entries = "", [], []
        text = self.echo_texts[p] + text
        if self.req.logprobs is not None:
            plp = prompt_logprobs or [None] * len(self.encoded[p])
            token_ids, entries = self.encoded[p] + token_ids, list(plp) + entries
        return text, token_ids, entries

    async def logprobs(self, token_ids: list[int], entries: list, offset: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        return await completion_logprobs(self.core, self.model, token_ids, entries, offset)

    def envelope(self, choices: list[dict], **extra) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def choice(self, index: int, text: str, lp: dict | None, finish_reason, reason) -> dict:
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason,
                "stop_reason": stop_reason(self.params, reason, finish_reason)}

    async def body(self, c: Collected) -> dict:
        out = []
        for idx, ch in sorted(c.choices.items()):
            p = idx // self.params.n
            first = c.firsts.get(p)
            text, token_ids, entries = self.echoed(p, ch.text, ch.token_ids, ch.logprobs,
                                                    first.prompt_logprobs if first is not None else None)
            lp = await self.logprobs(token_ids, entries, 0)
            out.append(self.choice(idx, text, lp, "length" if self.score_only else ch.finish_reason,
                                   None if self.score_only else ch.stop_reason))
        u = c.usage()
        if self.score_only:
            u = usage(u["prompt_tokens"], 0)
        return self.envelope(out, usage=u)

    async def events(self, run: Run) -> AsyncIterator[str]:
        stream = _CompletionEvents(self)
        path = None
        try:
            async for p, chunk in run.chunks():
                for event in await stream.add(p, chunk):
                    yield event
                if p == 0 and chunk.finished:
                    path = chunk.timing.get("first_token_path")
            if self.req.include_usage:
                yield sse(self.envelope([], usage=usage(stream.prompt_tokens, stream.completion_tokens)))
            if self.stamps is not None and path:  # the first prompt's first token, hop by hop (docs/router.md)
                hops = sorted([*self.stamps, *path], key=lambda h: h[1])
                yield sse(self.envelope([], folio_timing={"first_token_path": [[h, ns] for h, ns in hops]}))
        except Exception as e:  # noqa: BLE001 - after the 200 went out: an error event, then [DONE] (as vLLM does)
            yield sse(json.loads(from_exception(e).body))
        yield "data: [DONE]\n\n"


class _CompletionEvents:
    """A completions event stream's running state: text sent per choice (for text offsets) and usage."""

    def __init__(self, job: _Completion):
        self.job = job
        self.sent_len: dict[int, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        """Of the finished prompts (from their usage)."""
        self.generated = 0
        """Tokens streamed so far (for continuous usage)."""

    async def add(self, p: int, chunk: Chunk) -> list[str]:
        if chunk.prompt_token_ids is not None:
            self.prompt_tokens += len(chunk.prompt_token_ids)
        events = [e for c in chunk.choices if (e := await self._event(p, chunk, c)) is not None]
        if chunk.finished and chunk.usage is not None and not self.job.score_only:
            self.completion_tokens += chunk.usage.completion_tokens
        return events

    async def _event(self, p: int, chunk: Chunk, c: ChoiceDelta) -> str | None:
        job = self.job
        idx = p * job.params.n + c.index
        text, token_ids, entries = c.text, c.token_ids, c.logprobs or []
        if job.score_only:
            text, token_ids, entries = "", [], []
        if idx not in self.sent_len:
            text, token_ids, entries = job.echoed(p, text, token_ids, entries, chunk.prompt_logprobs)
        if not job.score_only:
            self.generated += len(c.token_ids)
        if not text and not token_ids and c.finish_reason is None:
            return None
        offset = self.sent_len.get(idx, 0)
        lp = await job.logprobs(token_ids, entries, offset)
        self.sent_len[idx] = offset + len(text)
        finish, reason = c.finish_reason, c.stop_reason
        if job.score_only and finish is not None:
            finish, reason = "length", None
        event = job.envelope([job.choice(idx, text, lp, finish, reason)])
        if job.req.include_usage:
            event["usage"] = usage(self.prompt_tokens, self.generated) if job.req.continuous_usage else None
        return sse(event)
