"""POST /v1/chat/completions: messages through the model's chat template -> one generation of n
choices, as one JSON body or a chunk stream opening with the assistant role; chat-shaped logprobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from services.common.errors import InvalidArgument
from services.common.sampling_params import SamplingParams
from services.router.core import ChoiceDelta, Chunk, GenerateInput, RouterCore
from services.router.metrics import RouterMetrics
from services.router.openai.errors import from_exception
from services.router.openai.logprobs import chat_logprobs
from services.router.openai.protocol import ChatCompletionRequest
from services.router.openai.run import EventStream, Run, cancel_on_disconnect
from services.router.openai.serving import Collected, sampling_params, sse, stop_reason, usage
from services.router.openai.structured import structured_outputs
from services.router.openai.tool_parsers import PARSERS
from services.router.openai.tools import ToolCallStream, ToolPlan, call_id, plan


class ChatCompletions:
    def __init__(self, core: RouterCore, metrics: RouterMetrics, request_timeout_s: float | None,
                 tool_call_parser: str = "hermes"):
        self.tool_parser = PARSERS[tool_call_parser]
        self.core = core
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        job = await self._prepare(req)
        run = Run(self.core, self.metrics, [job.input(self.request_timeout_s)])
        if req.stream:
            return EventStream(run, job.events(run))
        collected = await cancel_on_disconnect(raw, Collected.of(run, job.params.n, 1), run)
        return JSONResponse(await job.body(collected))

    async def _prepare(self, req: ChatCompletionRequest) -> _Chat:
        """Validate, build the params, render and tokenize the messages, check the context limit."""
        if not req.messages:
            raise InvalidArgument("messages: at least one message is required")
        limits = self.core.limits  # sizes first: nothing below is built per choice or per message before this
        limits.check_n(req.n)
        limits.check_n(req.best_of, "best_of")
        limits.check_logprobs(req.top_logprobs, "top_logprobs")
        limits.check_stop(req.stop)
        limits.check_count("messages", req.messages, "max_messages")
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list):
                limits.check_count(f"messages[{i}].content", m.content, "max_content_parts")
        tools = plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        if tools is not None and tools.constraint is not None and structured_outputs(req) is not None:
            raise InvalidArgument("tool_choice: required or a named function cannot be combined with "
                                  "response_format / structured_outputs / guided_*")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidArgument("top_logprobs: requires logprobs to be true")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                 structured=tools.constraint if tools is not None else None)
        limits.check_params(params, logprobs_field="top_logprobs")
        limits.check_max_tokens(max_tokens, self.core.max_model_len(self.core.resolve_model(req.model)),
                                "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        tool_defs = [{"type": "function", "function": {k: v for k, v in f.items() if v is not None}}
                     for f in tools.tools] if tools is not None else None
        model, ids = await self.core.encode(GenerateInput(params=params, model=req.model, messages=_messages(req),
                                                          tools=tool_defs,
                                                          add_generation_prompt=req.add_generation_prompt))
        self.core.check_context(model, len(ids), max_tokens, "messages")
        return _Chat(self.core, req, params, model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ids,
                     tools, self.tool_parser)


def _messages(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the tokenizer's chat template takes them (text parts joined by newlines)."""
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
            content = "\n".join(part.text for part in content)
        msg = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    return messages


@dataclass
class _Chat:
    """One chat request, prepared: what its body or events are made from."""

    core: RouterCore
    req: ChatCompletionRequest
    params: SamplingParams
    model: str
    rid: str
    created: int
    prompt_token_ids: list[int]
    tools: ToolPlan | None = None
    tool_parser: object = None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message for a finished choice's text, and its finish reason (tool_calls when it
        called tools and ended on its own)."""
        calls = []
        content = text
        if self.tools is not None and self.tools.constraint is not None:
            s = ToolCallStream(self.tools)
            s.feed(text)
            calls, content = s.calls, None
        elif self.tools is not None:  # auto: the model's own format
            content, parsed = self.tool_parser(text)
            calls = [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}} for n, a in parsed]
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        msg = {"role": "assistant", "content": content, "tool_calls": calls}
        return msg, "tool_calls" if finish_reason == "stop" else finish_reason

    def input(self, timeout_s: float | None) -> GenerateInput:
        return GenerateInput(params=self.params, model=self.model, prompt_token_ids=self.prompt_token_ids,
                             request_id=self.rid, timeout_s=timeout_s)

    async def logprobs(self, token_ids: list[int], entries: list) -> dict | None:
        if not self.req.logprobs:
            return None
        return {"content": await chat_logprobs(self.core, self.model, token_ids, entries, self.req.top_logprobs or 0)}

    def envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    async def body(self, c: Collected) -> dict:
        out = []
        for idx, ch in sorted(c.choices.items()):
            message, finish_reason = self.message(ch.text, ch.finish_reason)
            out.append({"index": idx, "message": message,
                        "logprobs": await self.logprobs(ch.token_ids, ch.logprobs), "finish_reason": finish_reason,
                        "stop_reason": stop_reason(self.params, ch.stop_reason, ch.finish_reason)})
        return self.envelope("chat.completion", out, usage=c.usage())

    async def events(self, run: Run) -> AsyncIterator[str]:
        stream = _ChatEvents(self)
        try:
            async for _, chunk in run.chunks():
                for event in await stream.add(chunk):
                    yield event
            if self.req.include_usage:
                yield sse(self.envelope("chat.completion.chunk", [],
                                        usage=usage(stream.prompt_tokens, stream.completion_tokens)))
        except Exception as e:  # noqa: BLE001 - after the 200 went out: an error event, then [DONE] (as vLLM does)
            yield sse(json.loads(from_exception(e).body))
        yield "data: [DONE]\n\n"


class _ChatEvents:
    """A chat event stream's running state: whether the role went out, and usage."""

    def __init__(self, job: _Chat):
        self.job = job
        self.started = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        """From the last chunk's usage."""
        self.generated = 0
        """Tokens streamed so far (for continuous usage)."""
        self.calls: dict[int, ToolCallStream] = {}
        """Per choice, for tool_choice required / named: the output as tool-call deltas."""
        self.held: dict[int, str] = {}
        """Per choice, for tool_choice auto: the text, held until the end (it may be a call)."""

    async def add(self, chunk: Chunk) -> list[str]:
        if chunk.prompt_token_ids is not None:
            self.prompt_tokens = len(chunk.prompt_token_ids)
        events = []
        if not self.started:  # the role first, one event per choice (as OpenAI and vLLM send it)
            self.started = True
            events = [self._event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}) for i in range(self.job.params.n)]
        for c in chunk.choices:
            self.generated += len(c.token_ids)
            if self.job.tools is not None and self.job.tools.constraint is None:
                self.held[c.index] = self.held.get(c.index, "") + c.text
                if c.finish_reason is None:
                    continue
            if c.text or c.finish_reason is not None or (self.job.req.logprobs and c.token_ids):
                events.append(self._event(await self._choice(c)))
        if chunk.finished and chunk.usage is not None:
            self.completion_tokens += chunk.usage.completion_tokens
        return events

    async def _choice(self, c: ChoiceDelta) -> dict:
        delta, finish_reason = ({"content": c.text} if c.text else {}), c.finish_reason
        tools = self.job.tools
        if tools is not None and tools.constraint is not None:
            stream = self.calls.setdefault(c.index, ToolCallStream(tools))
            deltas = stream.feed(c.text)
            delta = {"tool_calls": [d.to_dict() for d in deltas]} if deltas else {}
            if finish_reason == "stop" and stream.calls:
                finish_reason = "tool_calls"
        elif tools is not None and finish_reason is not None:  # auto: the whole text, as content or calls
            message, finish_reason = self.job.message(self.held.pop(c.index, ""), finish_reason)
            delta = {k: v for k, v in message.items() if k != "role" and v is not None}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(delta["tool_calls"])]
        choice = {"index": c.index, "delta": delta,
                  "logprobs": await self.job.logprobs(c.token_ids, c.logprobs or []), "finish_reason": finish_reason}
        if c.finish_reason is not None:
            choice["stop_reason"] = stop_reason(self.job.params, c.stop_reason, c.finish_reason)
        return choice

    def _event(self, choice: dict) -> str:
        e = self.job.envelope("chat.completion.chunk", [choice])
        if self.job.req.include_usage:
            e["usage"] = usage(self.prompt_tokens, self.generated) if self.job.req.continuous_usage else None
        return sse(e)
