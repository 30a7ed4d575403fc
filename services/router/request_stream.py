"""One request's way through the engines: `RequestStream` holds its state and names its transitions.

A stream: encode -> choose an engine (reserving its blocks) -> consume the engine's messages, each
becoming one `Chunk` -> done. An engine failure is one of three transitions (`_engine_failed`):
before the first token, retry on another engine; after tokens were streamed and n == 1, resume on
another engine from the prompt plus the tokens so far (same text stream, so no token is lost or
repeated); otherwise, or when the attempts run out, give up with a clear error. Each sequence's text
comes from its `SequenceOutput` (see there). It talks to engines, tokenizer and registry only through
the interfaces in services/router/clients.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from services.common import telemetry
from services.common.errors import DeadlineExceeded, FolioError, InvalidArgument, ResourceExhausted, Unavailable
from services.common.output_processor import TextStream
from services.common.sampling_params import SamplingParams
from services.router.clients import (
    Detokenizer, EngineCall, EngineChoice, EngineClient, EngineFailed, EngineMessage, EngineRequest, Registry,
    SequenceUpdate, TokenizerClient,
)
from services.router.engine_watch import EngineWatch
from services.router.messages import ChoiceDelta, Chunk, GenerateInput, Usage

log = logging.getLogger("folio.router")

# Engine statuses that mean "try another engine" (before the first token, or with failover after).
RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"}


@dataclass
class RouterStats:
    in_flight: int = 0
    retries: int = 0
    failovers: int = 0
    requests_total: int = 0


@dataclass
class Route:
    """What a request stream talks to: RouterCore's collaborators for the request's model."""

    registry: Registry
    engines: EngineClient
    tokenizer: TokenizerClient | None
    stats: RouterStats
    max_attempts: int
    watch: EngineWatch | None = None
    """Hung-engine detection (services/router/engine_watch.py): told of calls and their progress."""


class SequenceOutput:
    """One sequence's output as it streams: token ids -> text through its detokenizer (the tokenizer
    service), then stop strings and hold-back through its `TextStream` (the one owner of text rules,
    services/common/output_processor.py); its token count, and whether it finished."""

    def __init__(self, index: int, params: SamplingParams, detok: Detokenizer):
        self.index = index
        self.params = params
        self.detok = detok
        self.text = TextStream(params)
        self.num_tokens = 0
        self.finished = False

    async def advance(self, upd: SequenceUpdate) -> ChoiceDelta:
        reason, stop = upd.finish_reason, upd.stop_reason
        self.num_tokens += len(upd.token_ids)
        piece = await self.detok.add(upd.token_ids, flush=reason is not None)
        # The EOS or stop token that ended the sequence (or an abort) is not searched for stop strings.
        ended_by_engine = reason == "abort" or (reason == "stop" and not isinstance(stop, str))
        text = self.text.add(piece, self.num_tokens, check_stop=not ended_by_engine)
        if self.text.stop_string is not None:
            reason, stop = "stop", self.text.stop_string
        elif reason is not None:
            text += self.text.flush()
        self.finished = reason is not None
        logprobs = upd.logprobs if self.params.logprobs is not None else None
        return ChoiceDelta(self.index, text, upd.token_ids, logprobs, reason, stop)

    async def end(self, completed: bool) -> None:
        if completed:
            await self.detok.finish()
        else:
            self.detok.close()


class RequestStream:
    """One request's state, in fields, and its transitions. `run()` yields its chunks."""

    def __init__(self, route: Route, inp: GenerateInput, model: str, deadline: float | None):
        self.route = route
        self.inp = inp
        self.params = inp.params
        self.model = model
        self.rid = inp.request_id or f"req-{uuid.uuid4().hex[:20]}"
        self.deadline = deadline
        self.t0 = time.monotonic()
        self.prompt_ids: list[int] = []
        self.seqs: dict[int, SequenceOutput] = {}
        self.generated: list[int] = []
        """Sequence 0's tokens so far: what a resumed request continues from (n == 1)."""
        self.completion_tokens = 0
        # engines
        self.attempts = 0
        self.engine: EngineChoice | None = None
        self.excluded: set[str] = set()
        self.failures: list[str] = []
        # the consumer's view
        self.announced = False
        """Whether the current engine's id went out (on its first chunk)."""
        self.sent_first = False
        self.ttft: float | None = None
        self.queue_s: float | None = None
        self.completed = False

    # --- the whole request ------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[Chunk]:
        with telemetry.span("folio.router.generate", **{"folio.request_id": self.rid, "folio.model": self.model}) as span:
            self.prompt_ids = await encode_prompt(self.route.tokenizer, self.inp, self.model, self.deadline)
            if span.is_recording():
                span.set_attribute("folio.prompt_tokens", len(self.prompt_ids))
            if self.route.tokenizer is not None:
                self._sequence(0).detok.open_early()
            try:
                async with aclosing(self._attempts()) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                for seq in self.seqs.values():
                    await seq.end(self.completed)
            if span.is_recording():
                span.set_attributes({"folio.output_tokens": self.completion_tokens,
                                     "folio.engine_id": self.engine.engine_id,
                                     "folio.time_to_first_token_ms": (self.ttft or 0) * 1000,
                                     "folio.attempts": self.attempts})

    async def _attempts(self) -> AsyncIterator[Chunk]:
        """Engine after engine until the request completes (or `_engine_failed` gives up)."""
        watch = self.route.watch
        while not self.completed:
            call = await self._call_engine()
            engine_id = self.engine.engine_id
            untrack = watch.track(engine_id, call.fail) if watch is not None else None
            try:
                async with aclosing(call.messages()) as messages:
                    async for msg in messages:
                        if watch is not None:
                            watch.progress(engine_id)
                        chunk = await self._consume(msg)
                        if chunk.worth_sending():
                            self.sent_first = True
                            yield chunk
                        if self.completed and not msg.finished:
                            break  # the router saw a stop string first: the cancel below aborts the engine side
                        # else read on: the engine's stream ends now, and ending it cleanly closes its span
                if not self.completed:
                    raise Unavailable(f"engine {self.engine.engine_id} ended the stream early")
            except EngineFailed as f:
                await self._engine_failed(f.error)
            finally:
                if untrack is not None:
                    untrack()
                call.cancel()  # no-op when finished; aborts the engine request otherwise

    # --- choose an engine -------------------------------------------------------------------------
    async def _call_engine(self) -> EngineCall:
        self.attempts += 1
        self.engine = await self._choose()
        self.announced = False
        req = EngineRequest(self.rid, self.model, self.prompt_ids + self.generated, self._resume_params())
        return self.route.engines.generate(self.engine.address, req, remaining(self.deadline))

    async def _choose(self) -> EngineChoice:
        hung = self.route.watch.hung() if self.route.watch is not None else set()
        choice = await self.route.registry.choose(self.model, self.rid, self._blocks_needed(), self.excluded | hung)
        if choice is not None:
            return choice
        if self.excluded and self.failures and all(c == "RESOURCE_EXHAUSTED" for c in self.failures):
            raise ResourceExhausted(f"the waiting queue of every engine serving {self.model!r} is full; retry later")
        if self.excluded:
            raise Unavailable(f"no other live engine serves {self.model!r} (tried {len(self.excluded)})")
        raise Unavailable(f"no live engine serves {self.model!r}")

    def _blocks_needed(self) -> int:
        bs = next((e.load.block_size for e in self.route.registry.view if e.model == self.model), 16)
        return -(-(len(self.prompt_ids) + len(self.generated) + 1) // bs)

    def _resume_params(self) -> SamplingParams:
        """Params for continuing after `generated` tokens on another engine (the same request otherwise)."""
        p, done = self.params, len(self.generated)
        if not done:
            return p
        return dataclasses.replace(p, max_tokens=None if p.max_tokens is None else p.max_tokens - done,
                                   min_tokens=max(0, p.min_tokens - done))

    # --- consume an engine message ----------------------------------------------------------------
    async def _consume(self, msg: EngineMessage) -> Chunk:
        chunk = Chunk(request_id=self.rid, model=self.model, choices=[])
        if not self.announced:
            chunk.engine_id, self.announced = self.engine.engine_id, True
        if not self.sent_first:
            chunk.prompt_token_ids, chunk.prompt_logprobs = list(self.prompt_ids), msg.prompt_logprobs
        for upd in msg.sequences:
            seq = self._sequence(upd.index)
            if seq.finished:
                continue
            chunk.choices.append(await seq.advance(upd))
            if upd.index == 0:
                self.generated.extend(upd.token_ids)
            self.completion_tokens += len(upd.token_ids)
        if self.ttft is None and any(c.token_ids for c in chunk.choices):
            self.ttft = time.monotonic() - self.t0
        if self.queue_s is None:
            self.queue_s = msg.queue_s
        if msg.finished or sum(s.finished for s in self.seqs.values()) >= self.params.n:
            self._finish(chunk, msg)
        return chunk

    def _sequence(self, index: int) -> SequenceOutput:
        if index not in self.seqs:
            if self.route.tokenizer is None:
                raise Unavailable(f"model: no tokenizer service for {self.model!r}")
            detok = self.route.tokenizer.detokenizer(self.params.skip_special_tokens)
            self.seqs[index] = SequenceOutput(index, self.params, detok)
        return self.seqs[index]

    def _finish(self, chunk: Chunk, msg: EngineMessage) -> None:
        chunk.finished = True
        chunk.usage = Usage(len(self.prompt_ids), self.completion_tokens, msg.cached_tokens)
        chunk.timing = {"time_to_first_token_s": self.ttft, "total_s": time.monotonic() - self.t0,
                        "engine_queue_s": self.queue_s}
        self.completed = True

    # --- engine failed: retry, resume elsewhere, or give up ---------------------------------------
    async def _engine_failed(self, err: FolioError) -> None:
        """Returns when another engine should take the request over; raises to give up."""
        if err.status == "DEADLINE_EXCEEDED":
            raise DeadlineExceeded("deadline exceeded") from None
        if err.status not in RETRYABLE:
            raise err from None
        engine_id = self.engine.engine_id
        self.excluded.add(engine_id)
        self.failures.append(err.status)
        if err.status != "RESOURCE_EXHAUSTED":
            self.route.registry.mark_suspect(engine_id)
        if not self.generated and self.completion_tokens == 0:
            await self.route.registry.release(engine_id, self.rid)
            self.route.stats.retries += 1
            log.warning("%s: engine %s failed before the first token (%s: %s); retrying elsewhere",
                        self.rid, engine_id, err.status, err)
        elif self.params.n == 1 and self.params.prompt_logprobs is None:
            self.route.stats.failovers += 1
            log.warning("%s: engine %s failed after %d tokens (%s); continuing on another engine",
                        self.rid, engine_id, len(self.generated), err.status)
        else:
            raise Unavailable(f"engine {engine_id} failed mid-stream ({err.status}) and "
                              f"a request with n={self.params.n} cannot be resumed elsewhere") from None
        if self.attempts >= self.route.max_attempts:
            raise err from None


async def encode_prompt(tokenizer: TokenizerClient | None, inp: GenerateInput, model: str,
                        deadline: float | None) -> list[int]:
    """The prompt's token ids: given, or from the tokenizer service (text or chat messages)."""
    if inp.prompt_token_ids is not None:
        if not inp.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids: must contain at least one token")
        return list(inp.prompt_token_ids)
    if tokenizer is None:
        raise Unavailable(f"model: no tokenizer service for {model!r}; give prompt_token_ids")
    if inp.messages is None and inp.prompt is None:
        raise InvalidArgument("prompt: give a prompt, messages or prompt_token_ids")
    ids = await tokenizer.encode(text=inp.prompt, messages=inp.messages, add_special_tokens=inp.add_special_tokens,
                                 add_generation_prompt=inp.add_generation_prompt, timeout_s=remaining(deadline))
    if not ids:
        raise InvalidArgument("prompt: encodes to no tokens")
    return ids


def remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded")
    return left
