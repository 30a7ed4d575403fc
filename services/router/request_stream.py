"""One request's way through the engines: `RequestStream` holds its state and names its transitions.

A stream: encode -> choose an engine (reserving its blocks) -> consume the engine's messages, each
becoming one `Chunk` -> done. An engine failure is one of three transitions (`_engine_failed`):
before the first token, retry on another engine; after tokens were streamed, resume on another engine
from the prompt plus the tokens so far (same text stream, so no token is lost or repeated): for n == 1
the request itself, for n > 1 each unfinished sequence as its own n = 1 continuation (`_continue_apart`);
when the attempts run out, give up with a clear error. Each sequence's text
comes from its `SequenceOutput` (see there). It talks to engines, tokenizer and registry only through
the interfaces in services/router/clients.py.
"""

from __future__ import annotations

import asyncio
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
from services.common import eager
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
    calls_ahead: int = 0
    """Engine calls started on the predicted engine before Redis's choice, and kept (it agreed)."""
    calls_moved: int = 0
    """Engine calls started on the predicted engine and cancelled (Redis chose another)."""


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
    """One sequence's output as it streams: token ids -> text through its detokenizer (in this process,
    or the tokenizer service's stream; services/router/local_detokenizer.py), then stop strings and
    hold-back through its `TextStream` (the one owner of text rules, services/common/output_processor.py);
    its token count, and whether it finished."""

    def __init__(self, index: int, params: SamplingParams, detok: Detokenizer):
        self.index = index
        self.params = params
        self.detok = detok
        self.text = TextStream(params)
        self.token_ids: list[int] = []
        """Generated so far: what a continuation on another engine starts from."""
        self.finished = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    async def advance(self, upd: SequenceUpdate) -> ChoiceDelta:
        reason, stop = upd.finish_reason, upd.stop_reason
        self.token_ids.extend(upd.token_ids)
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
        self.completion_tokens = 0
        self.apart = False
        """n > 1 after an engine failed mid-stream: each unfinished sequence continues on its own."""
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
        self.first_token_path: list[tuple[str, int]] = [("router.received", time.monotonic_ns())]
        """The first token's hops (hop, time.monotonic_ns()), the engine's among the router's; docs/router.md."""
        self.completed = False

    # --- the whole request ------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[Chunk]:
        with telemetry.span("folio.router.generate", **{"folio.request_id": self.rid, "folio.model": self.model}) as span:
            self.prompt_ids = await encode_prompt(self.route.tokenizer, self.inp, self.model, self.deadline)
            if span.is_recording():
                span.set_attribute("folio.prompt_tokens", len(self.prompt_ids))
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
            if self.apart:
                async with aclosing(self._continue_apart()) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            call = await self._call_engine()
            if self.attempts == 1 and self.route.tokenizer is not None:
                # Sequence 0's text stream (and a service detokenizer's stream) set up while the engine works,
                # not before its request went out.
                self._sequence(0).detok.open_early()
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
        done = self.seqs[0].token_ids if 0 in self.seqs else []
        req = EngineRequest(self.rid, self.model, self.prompt_ids + done, self._resume_params(0))
        self.engine, call = await self._start_call(req, 0, self.excluded, stamp=self.ttft is None)
        self.announced = False
        return call

    async def _start_call(self, req: EngineRequest, generated: int, excluded: set[str],
                          stamp: bool = False) -> tuple[EngineChoice, EngineCall]:
        """Choose an engine and call it, the call overlapping the choice where it can: when the cached
        view leaves Redis one engine to choose (`Registry.predict`), the call to it starts first and runs
        while Redis chooses and reserves (one atomic step, as before; it decides). Kept when Redis agrees;
        otherwise (the engine went away meanwhile) cancelled and the chosen engine, if any, called. So
        choose-and-reserve is off the first token's path. `stamp`: add the first token's hops (docs/router.md)."""
        hung = self.route.watch.hung() if self.route.watch is not None else set()
        guess = self.route.registry.predict(self.model, excluded | hung)
        early = None
        started_ns = time.monotonic_ns()
        if guess is not None:
            early = self.route.engines.generate(guess.address, req, remaining(self.deadline))
        try:
            if early is not None and not eager.EAGER:
                await asyncio.sleep(0)  # its request goes out on the loop's next turn: before Redis's command
            choice = await self._choose(req.request_id, generated, excluded, hung)
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        chosen_ns = time.monotonic_ns()
        if early is not None and (guess.engine_id, guess.address) == (choice.engine_id, choice.address):
            self.route.stats.calls_ahead += 1
            call = early
        else:
            if early is not None:
                early.cancel()
                self.route.stats.calls_moved += 1
                log.debug("%s: predicted engine %s, Redis chose %s; call moved", req.request_id, guess.engine_id,
                          choice.engine_id)
            started_ns = time.monotonic_ns()
            call = self.route.engines.generate(choice.address, req, remaining(self.deadline))
        if stamp:
            self.first_token_path += sorted([("router.engine_call", started_ns), ("router.chosen", chosen_ns)],
                                            key=lambda s: s[1])
        return choice, call

    async def _choose(self, request_id: str | None = None, generated: int = 0,
                      excluded: set[str] | None = None, hung: set[str] | None = None) -> EngineChoice:
        excluded = self.excluded if excluded is None else excluded
        if hung is None:
            hung = self.route.watch.hung() if self.route.watch is not None else set()
        choice = await self.route.registry.choose(self.model, request_id or self.rid, self._blocks_needed(generated),
                                                  excluded | hung)
        if choice is not None:
            return choice
        if excluded and self.failures and all(c == "RESOURCE_EXHAUSTED" for c in self.failures):
            raise ResourceExhausted(f"the waiting queue of every engine serving {self.model!r} is full; retry later")
        if excluded:
            raise Unavailable(f"no other live engine serves {self.model!r} (tried {len(excluded)})")
        raise Unavailable(f"no live engine serves {self.model!r}")

    def _blocks_needed(self, generated: int = 0) -> int:
        bs = next((e.load.block_size for e in self.route.registry.view if e.model == self.model), 16)
        if not generated and 0 in self.seqs:
            generated = self.seqs[0].num_tokens
        return -(-(len(self.prompt_ids) + generated + 1) // bs)

    def _resume_params(self, index: int) -> SamplingParams:
        """Params for continuing sequence `index` after its tokens so far on another engine (the request's own
        params when nothing was generated yet). A continuation has n = 1 and no prompt logprobs (they went
        out on the first chunk); a seeded sequence continues from a seed of its own, fixed by (seed, index),
        so a resumed request is as reproducible as the original (the generator's state cannot move)."""
        p = self.params
        done = self.seqs[index].num_tokens if index in self.seqs else 0
        if not done and not self.apart:
            return p
        seed = p.seed if p.seed is None or p.n == 1 else (p.seed * 1_000_003 + index + 1) % (2**63)
        so = p.structured_outputs  # the grammar goes on from where the sequence was
        so = so if so is None else dataclasses.replace(so, resume_tokens=so.resume_tokens + done)
        return dataclasses.replace(p, n=1, prompt_logprobs=None, seed=seed,
                                   max_tokens=None if p.max_tokens is None else p.max_tokens - done,
                                   min_tokens=max(0, p.min_tokens - done), structured_outputs=so)

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
            self.completion_tokens += len(upd.token_ids)
        if self.ttft is None and any(c.token_ids for c in chunk.choices):
            self.ttft = time.monotonic() - self.t0
            self.first_token_path += (msg.first_token_path or []) + [("router.chunk_ready", time.monotonic_ns())]
        if self.queue_s is None:
            self.queue_s = msg.queue_s
        if msg.finished or sum(s.finished for s in self.seqs.values()) >= self.params.n:
            self._finish(chunk, msg.cached_tokens)
        return chunk

    def _sequence(self, index: int) -> SequenceOutput:
        if index not in self.seqs:
            if self.route.tokenizer is None:
                raise Unavailable(f"model: no tokenizer service for {self.model!r}")
            detok = self.route.tokenizer.detokenizer(self.params.skip_special_tokens)
            self.seqs[index] = SequenceOutput(index, self.params, detok)
        return self.seqs[index]

    def _finish(self, chunk: Chunk, cached_tokens: int) -> None:
        chunk.finished = True
        chunk.usage = Usage(len(self.prompt_ids), self.completion_tokens, cached_tokens)
        chunk.timing = {"time_to_first_token_s": self.ttft, "total_s": time.monotonic() - self.t0,
                        "engine_queue_s": self.queue_s, "first_token_path": self.first_token_path}
        self.completed = True

    # --- engine failed: retry, resume elsewhere, or give up ---------------------------------------
    async def _engine_failed(self, err: FolioError) -> None:
        """Returns when another engine should take the request over; raises to give up."""
        engine_id = self.engine.engine_id
        self._exclude_failed(err, engine_id, self.excluded)
        self.failures.append(err.status)
        if self.completion_tokens == 0:
            await self.route.registry.release(engine_id, self.rid)
            self.route.stats.retries += 1
            log.warning("%s: engine %s failed before the first token (%s: %s); retrying elsewhere",
                        self.rid, engine_id, err.status, err)
        else:
            self.route.stats.failovers += 1
            self.apart = self.params.n > 1
            log.warning("%s: engine %s failed after %d tokens (%s); continuing on another engine%s",
                        self.rid, engine_id, self.completion_tokens, err.status,
                        " (each unfinished sequence on its own)" if self.apart else "")
        if self.attempts >= self.route.max_attempts:
            raise err from None

    def _exclude_failed(self, err: FolioError, engine_id: str, excluded: set[str]) -> None:
        """The rule every attempt shares: a deadline ends the request and a status another engine
        could not fix is the answer (both raise); otherwise the engine is excluded, and marked suspect
        unless it was only full."""
        if err.status == "DEADLINE_EXCEEDED":
            raise DeadlineExceeded("deadline exceeded") from None
        if err.status not in RETRYABLE:
            raise err from None
        excluded.add(engine_id)
        if err.status != "RESOURCE_EXHAUSTED":
            self.route.registry.mark_suspect(engine_id)

    # --- n > 1 resumed: one n = 1 continuation per unfinished sequence ------------------------------
    async def _continue_apart(self) -> AsyncIterator[Chunk]:
        """Run each unfinished sequence's continuation concurrently; their chunks merge in arrival order,
        and the one that finishes the last sequence finishes the request."""
        queue: asyncio.Queue = asyncio.Queue()
        todo = [i for i in range(self.params.n) if not self._sequence(i).finished]
        tasks = [asyncio.create_task(self._continue_one(i, queue)) for i in todo]
        left = len(todo)  # sequences whose last choice has not gone out yet (finishes arrive in queue order)
        try:
            pending = len(tasks)
            while pending:
                item = await queue.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    left -= sum(c.finish_reason is not None for c in item.choices)
                    if left == 0:
                        self._finish(item, 0)
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _continue_one(self, index: int, queue: asyncio.Queue) -> None:
        """Sequence `index` alone (n = 1, its tokens so far appended to the prompt), engine after engine."""
        try:
            await self._run_one(index, queue)
        except Exception as e:  # noqa: BLE001 - handed to the merging generator
            queue.put_nowait(e)
            return
        queue.put_nowait(None)

    async def _run_one(self, index: int, queue: asyncio.Queue) -> None:
        seq, rid, watch = self.seqs[index], f"{self.rid}-{index}", self.route.watch
        excluded, attempts = set(self.excluded), 0
        while not seq.finished:
            attempts += 1
            req = EngineRequest(rid, self.model, self.prompt_ids + seq.token_ids, self._resume_params(index))
            engine, call = await self._start_call(req, seq.num_tokens, excluded)
            untrack = watch.track(engine.engine_id, call.fail) if watch is not None else None
            announced = False
            try:
                async with aclosing(call.messages()) as messages:
                    async for msg in messages:
                        if watch is not None:
                            watch.progress(engine.engine_id)
                        chunk = Chunk(request_id=self.rid, model=self.model, choices=[])
                        if not announced:
                            chunk.engine_id, announced = engine.engine_id, True
                        for upd in msg.sequences:
                            chunk.choices.append(await seq.advance(dataclasses.replace(upd, index=index)))
                            self.completion_tokens += len(upd.token_ids)
                        if chunk.worth_sending():
                            queue.put_nowait(chunk)
                        if seq.finished:
                            break
                if not seq.finished:
                    raise Unavailable(f"engine {engine.engine_id} ended the stream early")
            except EngineFailed as f:
                err = f.error
                self._exclude_failed(err, engine.engine_id, excluded)
                if attempts >= self.route.max_attempts:
                    raise err from None
                self.route.stats.failovers += 1
                log.warning("%s: engine %s failed on sequence %d after %d tokens (%s); continuing elsewhere",
                            self.rid, engine.engine_id, index, seq.num_tokens, err.status)
            finally:
                if untrack is not None:
                    untrack()
                call.cancel()


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
    tools = {"tools": inp.tools} if inp.tools else {}
    ids = await tokenizer.encode(text=inp.prompt, messages=inp.messages, add_special_tokens=inp.add_special_tokens,
                                 add_generation_prompt=inp.add_generation_prompt, timeout_s=remaining(deadline), **tools)
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
