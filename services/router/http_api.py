"""The OpenAI-compatible HTTP API (as vLLM serves it), a thin FastAPI layer over `RouterCore`.

It runs inside the router process, on the router's own asyncio loop (services/router/server.py serves
`build_app(core)` with uvicorn beside the gRPC server), so HTTP and gRPC requests share one
`RouterCore`: the same routing, failover, streaming and cancellation. See docs/http.md.

A request here: validate the body (pydantic; any validation failure is a 400 in OpenAI's error shape,
never a 422 or a 500) -> build `SamplingParams` (its ValueError names the field: 400) -> tokenize each
prompt through the core and check it against the context limit (400 giving the limit and the
prompt's length, as vLLM words it) -> one `RouterCore.generate()` per prompt, run concurrently and
merged -> one JSON body, or server-sent events ending with `data: [DONE]`. Domain errors map through
`FolioError.http_status` (404 unknown model, 429 + Retry-After when every engine's queue is full, 503
no engine). A client that disconnects cancels the generation tasks; the core then cancels the engine
calls and the engines free the requests' KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import FolioError, InvalidArgument, NotFound, Unavailable
from services.common.sampling_params import SamplingParams
from services.common.outputs import Logprob
from services.router.core import Chunk, GenerateInput, RouterCore
from services.router.metrics import CONTENT_TYPE, RouterMetrics

log = logging.getLogger("folio.router.http")

_INT64 = 2**63 - 1
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
                429: "RateLimitError", 499: "ClientClosedRequest", 500: "InternalServerError",
                503: "ServiceUnavailableError", 504: "TimeoutError"}


# --- request bodies (vLLM's field names and defaults) ------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _GenerationRequest(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions; unknown fields are ignored (as vLLM does)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64 - 1, le=_INT64)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(_GenerationRequest):
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


# --- errors ---------------------------------------------------------------------------------------
def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, with vLLM's `type` names and the status as `code`."""
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param,
                                   "code": status}}, status_code=status, headers=headers)


_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


def _param_of(message: str) -> str | None:
    """Folio's validation messages start with the field's name ("temperature must be >= 0, ...")."""
    head = message.split(" ", 1)[0].rstrip(":,").split("[", 1)[0]
    return head if head in _FIELDS or head in ("prompt_token_ids", "prompt_logprobs") else None


def _from_exception(exc: BaseException) -> JSONResponse:
    if isinstance(exc, FolioError) and exc.http_status != 500:
        status = exc.http_status
        headers = {"Retry-After": "1"} if status == 429 else None
        return error_response(status, str(exc), _param_of(str(exc)) if status in (400, 404) else None, headers)
    if isinstance(exc, ValueError):  # SamplingParams and protobuf range checks: the caller's input
        return error_response(400, str(exc), _param_of(str(exc)))
    if isinstance(exc, FolioError):  # a downstream INTERNAL/UNKNOWN status, after the core's retries
        log.error("request failed: %s", exc)
        return error_response(500, str(exc) or "internal error")
    log.exception("internal error", exc_info=exc)
    return error_response(500, "internal error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if not loc:
        return f"request body: {e.get('msg')}", None
    # Union members each report their own failure ("prompt.str", "prompt.list[int]"); keep the field path.
    path = ".".join(x for x in loc if not (x.startswith(("list[", "str", "int")) or x in ("function-after",)))
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {e.get('msg')}{extra}", path.split(".", 1)[0] or None


# --- generation: one core stream per prompt, merged -------------------------------------------------
_background: set[asyncio.Task] = set()


class _Run:
    """One HTTP request's generations (one per prompt), run as tasks and merged in arrival order.

    The tasks outlive a cancelled consumer only long enough to be cancelled themselves (`cancel()`),
    which closes each core stream and so the engine call."""

    def __init__(self, core: RouterCore, metrics: RouterMetrics, inputs: list[GenerateInput]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = len(inputs)
        self.buffer: list[tuple[int, Chunk]] = []
        self.tasks = [asyncio.create_task(self._pump(i, core, metrics, inp)) for i, inp in enumerate(inputs)]
        for t in self.tasks:
            _background.add(t)
            t.add_done_callback(_background.discard)

    async def _pump(self, i: int, core: RouterCore, metrics: RouterMetrics, inp: GenerateInput) -> None:
        try:
            async with aclosing(metrics.track(core.generate(inp))) as chunks:
                async for chunk in chunks:
                    self.queue.put_nowait((i, chunk))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            self.queue.put_nowait((i, e))
            return
        self.queue.put_nowait((i, None))

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()

    async def _next(self) -> tuple[int, Chunk] | None:
        while self.pending:
            i, item = await self.queue.get()
            if item is None:
                self.pending -= 1
            elif isinstance(item, BaseException):
                self.cancel()
                raise item
            else:
                return i, item
        return None

    async def started(self) -> None:
        """Wait until every prompt's stream has produced its first chunk (raising its error if it failed
        before that), so that errors become HTTP statuses rather than events in a 200 stream."""
        seen: set[int] = set()
        while len(seen) < len(self.tasks):
            i, item = await self.queue.get()
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            seen.add(i)
            if item is None:
                self.pending -= 1
            else:
                self.buffer.append((i, item))

    async def chunks(self) -> AsyncIterator[tuple[int, Chunk]]:
        try:
            while self.buffer:
                yield self.buffer.pop(0)
            while (nxt := await self._next()) is not None:
                yield nxt
        finally:
            self.cancel()  # no-op when all finished; on a disconnect, ends the engine calls


class _ClientGone(Exception):
    """The client disconnected before the response started."""


async def _cancel_on_disconnect(request: Request, coro, run: _Run):
    """Run `coro`, cancelling it and `run` if the client disconnects first (FastAPI has read the body, so
    the next ASGI message is the disconnect)."""
    task = asyncio.ensure_future(coro)
    gone = False

    async def watch():
        nonlocal gone
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        run.cancel()
        if gone:
            raise _ClientGone() from None
        raise
    finally:
        watcher.cancel()


# --- responses ------------------------------------------------------------------------------------
def _clip(lp: float) -> float:
    return max(lp, -9999.0)  # vLLM's floor: JSON has no -inf


class _Choice:
    """One choice's output as it accumulates."""

    def __init__(self):
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob] | None] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Api:
    def __init__(self, core: RouterCore, metrics: RouterMetrics, request_timeout_s: float | None):
        self.core = core
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s

    # --- shared steps ------------------------------------------------------------------------------
    @staticmethod
    def sampling_params(r: _GenerationRequest, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        if r.logit_bias:
            raise InvalidArgument("logit_bias: not supported")
        if r.stream_options is not None and not r.stream:
            raise InvalidArgument("stream_options: only allowed when stream is true")
        return SamplingParams(
            n=r.n, temperature=1.0 if r.temperature is None else r.temperature,
            top_p=1.0 if r.top_p is None else r.top_p, top_k=-1 if r.top_k in (None, 0) else r.top_k,
            min_p=r.min_p or 0.0, repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
            presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0, seed=r.seed,
            max_tokens=max_tokens, min_tokens=r.min_tokens, stop=r.stop, stop_token_ids=r.stop_token_ids,
            ignore_eos=r.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=r.skip_special_tokens, include_stop_str_in_output=r.include_stop_str_in_output)

    def check_context(self, model: str, prompt_len: int, max_tokens: int | None, what: str) -> None:
        limit = self.core.max_model_len(model)
        if limit is None:
            raise Unavailable(f"no live engine serves {model!r}")
        if prompt_len >= limit:
            raise InvalidArgument(f"{what}: This model's maximum context length is {limit} tokens. However, your "
                                  f"request has {prompt_len} input tokens. Please reduce the length of the input.")
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise InvalidArgument(f"max_tokens: This model's maximum context length is {limit} tokens. However, you "
                                  f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, "
                                  f"{max_tokens} in the completion). Please reduce the length of the {what} or "
                                  "completion.")

    async def token_text(self, model: str, token_id: int, entry: dict[int, Logprob] | None) -> str:
        lp = entry.get(token_id) if entry else None
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return await self.core.decode(model, [token_id], skip_special_tokens=False)

    async def completion_logprobs(self, model: str, token_ids: list[int], entries: list, offset: int) -> dict:
        """OpenAI's completions `logprobs` object for these tokens; text offsets start at `offset`."""
        out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for t, entry in zip(token_ids, entries):
            tok = await self.token_text(model, t, entry)
            out["tokens"].append(tok)
            out["text_offset"].append(offset)
            offset += len(tok)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_clip(entry[t].logprob))
            out["top_logprobs"].append({(lp.decoded_token if lp.decoded_token is not None else
                                         await self.token_text(model, tid, entry)): _clip(lp.logprob)
                                        for tid, lp in entry.items()})
        return out

    async def chat_logprobs(self, model: str, token_ids: list[int], entries: list, top: int) -> list[dict]:
        content = []
        for t, entry in zip(token_ids, entries):
            tok = await self.token_text(model, t, entry)
            alts = sorted(entry.items(), key=lambda kv: kv[1].rank or 1 << 30)[:top] if entry else []
            tops = []
            for tid, lp in alts:
                s = await self.token_text(model, tid, entry)
                tops.append({"token": s, "logprob": _clip(lp.logprob), "bytes": list(s.encode())})
            content.append({"token": tok, "logprob": _clip(entry[t].logprob) if entry else -9999.0,
                            "bytes": list(tok.encode()), "top_logprobs": tops})
        return content

    def _stop_reason(self, params: SamplingParams, reason):
        # Like vLLM: the stop string or a requested stop token id; EOS is None.
        if isinstance(reason, int) and reason not in params.stop_token_ids:
            return None
        return reason

    async def _collect(self, run: _Run, n: int, num_prompts: int):
        """Accumulate every choice; returns (choices by index, each prompt's last chunk, each prompt's first)."""
        choices = {i: _Choice() for i in range(n * num_prompts)}
        finals: list[Chunk] = []
        prompt_info: dict[int, Chunk] = {}
        async for p, chunk in run.chunks():
            if chunk.prompt_token_ids is not None:
                prompt_info[p] = chunk
            for c in chunk.choices:
                ch = choices[p * n + c.index]
                ch.text += c.text
                ch.token_ids += c.token_ids
                if c.logprobs is not None:
                    ch.logprobs += c.logprobs
                if c.finish_reason is not None:
                    ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
            if chunk.finished:
                finals.append(chunk)
        return choices, finals, prompt_info

    # --- endpoints ---------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        if req.suffix is not None:
            raise InvalidArgument("suffix: not supported")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidArgument(f"best_of: only best_of == n is supported (got best_of={req.best_of}, n={req.n})")
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidArgument("prompt: must not be empty")
        echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = self.sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs=echo_lp)
        model = self.core.resolve_model(req.model)
        encoded = await asyncio.gather(*[self._encode_prompt(model, p, params, req.add_special_tokens)
                                         for p in prompts])
        for ids in encoded:
            self.check_context(model, len(ids), params.max_tokens, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        inputs = [GenerateInput(params=params, model=model, prompt_token_ids=ids, request_id=f"{rid}-{i}",
                                timeout_s=self.request_timeout_s) for i, ids in enumerate(encoded)]
        echo_texts = None
        if req.echo:
            echo_texts = [p if isinstance(p, str) else await self.core.decode(model, ids, skip_special_tokens=False)
                          for p, ids in zip(prompts, encoded)]
        created = int(time.time())
        run = _Run(self.core, self.metrics, inputs)
        if req.stream:
            await _cancel_on_disconnect(raw, run.started(), run)
            events = self._completion_events(run, req, params, rid, created, model, encoded, echo_texts)
            return StreamingResponse(events, media_type="text/event-stream")
        choices, finals, prompt_info = await _cancel_on_disconnect(raw, self._collect(run, params.n, len(inputs)), run)
        out = []
        for idx, ch in sorted(choices.items()):
            p = idx // params.n
            text, token_ids, entries = ch.text, ch.token_ids, ch.logprobs
            if echo_texts is not None:
                text = echo_texts[p] + text
                if req.logprobs is not None:
                    first = prompt_info.get(p)
                    plp = (first.prompt_logprobs if first is not None else None) or [None] * len(encoded[p])
                    token_ids, entries = encoded[p] + token_ids, list(plp) + entries
            lp = (await self.completion_logprobs(model, token_ids, entries, 0)) if req.logprobs is not None else None
            out.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": ch.finish_reason,
                        "stop_reason": self._stop_reason(params, ch.stop_reason)})
        usage = _usage(sum(f.usage.prompt_tokens for f in finals), sum(f.usage.completion_tokens for f in finals))
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": out, "usage": usage})

    async def _encode_prompt(self, model: str, prompt, params: SamplingParams, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            _, ids = await self.core.encode(GenerateInput(params=params, model=model, prompt=prompt,
                                                          add_special_tokens=add_special_tokens))
            return ids
        return list(prompt)

    async def _completion_events(self, run: _Run, req: CompletionRequest, params: SamplingParams, rid: str,
                                 created: int, model: str, encoded: list[list[int]], echo_texts) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        n = params.n
        sent_len: dict[int, int] = {}
        prompt_tokens = completion_tokens = 0
        completion_by_prompt: dict[int, int] = {}
        try:
            async for p, chunk in run.chunks():
                if chunk.prompt_token_ids is not None:
                    prompt_tokens += len(chunk.prompt_token_ids)
                for c in chunk.choices:
                    idx = p * n + c.index
                    text, token_ids, entries = c.text, c.token_ids, c.logprobs or []
                    first = idx not in sent_len
                    if first and echo_texts is not None:
                        text = echo_texts[p] + text
                        if req.logprobs is not None:
                            plp = chunk.prompt_logprobs or [None] * len(encoded[p])
                            token_ids, entries = encoded[p] + token_ids, list(plp) + entries
                    completion_by_prompt[p] = completion_by_prompt.get(p, 0) + len(c.token_ids)
                    if not text and not token_ids and c.finish_reason is None:
                        continue
                    offset = sent_len.get(idx, 0)
                    lp = (await self.completion_logprobs(model, token_ids, entries, offset)
                          if req.logprobs is not None else None)
                    sent_len[idx] = offset + len(text)
                    event = {"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                                          "stop_reason": self._stop_reason(params, c.stop_reason)}]}
                    if include_usage:
                        done = sum(completion_by_prompt.values())
                        event["usage"] = _usage(prompt_tokens, done) if continuous else None
                    yield _sse(event)
                if chunk.finished and chunk.usage is not None:
                    completion_tokens += chunk.usage.completion_tokens
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                            "usage": _usage(prompt_tokens, completion_tokens)})
        except Exception as e:  # noqa: BLE001 - after the 200 went out: an error event, then [DONE] (as vLLM does)
            yield _sse(json.loads(_from_exception(e).body))
        yield "data: [DONE]\n\n"

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        if not req.messages:
            raise InvalidArgument("messages: at least one message is required")
        if req.tools and req.tool_choice not in (None, "none"):
            raise InvalidArgument("tools: tool calling is not supported")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise InvalidArgument("response_format: only {\"type\": \"text\"} is supported")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidArgument("top_logprobs: requires logprobs to be true")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
                content = "\n".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        params = self.sampling_params(req, max_tokens, top if req.logprobs else None)
        model, ids = await self.core.encode(GenerateInput(params=params, model=req.model, messages=messages,
                                                          add_generation_prompt=req.add_generation_prompt))
        self.check_context(model, len(ids), max_tokens, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        inp = GenerateInput(params=params, model=model, prompt_token_ids=ids, request_id=rid,
                            timeout_s=self.request_timeout_s)
        created = int(time.time())
        run = _Run(self.core, self.metrics, [inp])
        if req.stream:
            await _cancel_on_disconnect(raw, run.started(), run)
            return StreamingResponse(self._chat_events(run, req, params, rid, created, model),
                                     media_type="text/event-stream")
        choices, finals, _ = await _cancel_on_disconnect(raw, self._collect(run, params.n, 1), run)
        out = []
        for idx, ch in sorted(choices.items()):
            lp = ({"content": await self.chat_logprobs(model, ch.token_ids, ch.logprobs, top)}
                  if req.logprobs else None)
            out.append({"index": idx, "message": {"role": "assistant", "content": ch.text}, "logprobs": lp,
                        "finish_reason": ch.finish_reason, "stop_reason": self._stop_reason(params, ch.stop_reason)})
        usage = _usage(sum(f.usage.prompt_tokens for f in finals), sum(f.usage.completion_tokens for f in finals))
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": out, "usage": usage})

    async def _chat_events(self, run: _Run, req: ChatCompletionRequest, params: SamplingParams, rid: str,
                           created: int, model: str) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        top = req.top_logprobs or 0
        prompt_tokens = completion_tokens = generated = 0

        def event(choice: dict) -> str:
            e = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
            if include_usage:
                e["usage"] = _usage(prompt_tokens, generated) if continuous else None
            return _sse(e)

        try:
            started = False
            async for _, chunk in run.chunks():
                if chunk.prompt_token_ids is not None:
                    prompt_tokens = len(chunk.prompt_token_ids)
                if not started:  # the role first, one event per choice (as OpenAI and vLLM send it)
                    started = True
                    for i in range(params.n):
                        yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None})
                for c in chunk.choices:
                    generated += len(c.token_ids)
                    if not c.text and c.finish_reason is None and not (req.logprobs and c.token_ids):
                        continue
                    lp = ({"content": await self.chat_logprobs(model, c.token_ids, c.logprobs or [], top)}
                          if req.logprobs else None)
                    choice = {"index": c.index, "delta": {"content": c.text} if c.text else {}, "logprobs": lp,
                              "finish_reason": c.finish_reason}
                    if c.finish_reason is not None:
                        choice["stop_reason"] = self._stop_reason(params, c.stop_reason)
                    yield event(choice)
                if chunk.finished and chunk.usage is not None:
                    completion_tokens += chunk.usage.completion_tokens
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        except Exception as e:  # noqa: BLE001
            yield _sse(json.loads(_from_exception(e).body))
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [self._model_card(m, created) for m in self.core.list_models()]}

    @staticmethod
    def _model_card(m, created: int) -> dict:
        return {"id": m.id, "object": "model", "created": created, "owned_by": "folio", "root": m.id, "parent": None,
                "max_model_len": m.max_model_len, "permission": []}


class _ApiKeyAndCount:
    """ASGI middleware: the bearer token on /v1/* (when a key is set), and a response counter by status.

    Plain ASGI rather than BaseHTTPMiddleware, which would sit between the client and the streaming
    response's disconnect detection."""

    def __init__(self, app, api_key: str | None, metrics: RouterMetrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                 "/metrics") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(label, str(message["status"])).inc()
            await send(message)

        if self.expected is not None and path.startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(auth, self.expected):
                resp = error_response(401, "Unauthorized: give the API key as 'Authorization: Bearer <key>'")
                return await resp(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)


def build_app(core: RouterCore, api_key: str | None = None, metrics: RouterMetrics | None = None,
              request_timeout_s: float | None = None) -> FastAPI:
    """The ASGI app (FastAPI) over a started `RouterCore`."""
    metrics = metrics or RouterMetrics(core)
    api = _Api(core, metrics, request_timeout_s)
    app = FastAPI(title="Folio OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return _from_exception(exc)

    async def guarded(fn, *args):
        try:
            return await fn(*args)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the generation was cancelled
        except Exception as e:  # noqa: BLE001 - the one mapping point for this layer
            return _from_exception(e)

    @app.get("/health")
    async def health():
        if not core.list_models():
            return error_response(503, "no live engine")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            return {"version": dist_version("folio")}
        except PackageNotFoundError:
            return {"version": "unknown"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return api.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in core.list_models():
            if m.id == model_id:
                return api._model_card(m, int(time.time()))
        return _from_exception(NotFound(f"model: {model_id!r} is not served here"))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await guarded(api.completions, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await guarded(api.chat, body, raw)

    app.add_middleware(_ApiKeyAndCount, api_key=api_key, metrics=metrics)
    return app


__all__ = ["build_app", "CompletionRequest", "ChatCompletionRequest", "error_response"]
