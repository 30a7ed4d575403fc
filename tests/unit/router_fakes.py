"""Fake engine, tokenizer and registry clients for RouterCore tests on CPU (no processes, no gRPC).

The fake "model" counts: each next token is the previous token + 1, so a stream resumed on another
engine from the prompt plus the tokens so far continues exactly where it stopped, and a lost or
repeated token shows. The fake tokenizer maps token id t to the character chr(t) ("abc" <-> 97 98 99).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from services.common.errors import FolioError, ResourceExhausted, Unavailable
from services.router.clients import EngineFailed, EngineMessage, EngineRequest, SequenceUpdate
from services.router.core import RouterCore
from services.router.engine_watch import EngineWatch

MODEL = "fake-model"
EOS_ID = ord("|")


@dataclass
class FakeEngine:
    """How one fake engine behaves."""

    fail_after: int | None = None
    """Fail the call (with `error`) after streaming this many tokens per sequence; None: never."""
    error: type[FolioError] = Unavailable
    eos_at: int | None = None
    """Emit EOS_ID as this step's token and finish with "stop" (as an engine does on EOS)."""
    delay_s: float = 0.0
    """Pause before each token (a slow engine, to cancel in the middle)."""
    hang_after: int | None = None
    """Stop sending (a frozen engine) after this many tokens per sequence, until the call is failed."""
    calls: list[FakeEngineCall] = field(default_factory=list)


@dataclass
class FakeChoice:
    engine_id: str
    address: str


class FakeEngineCall:
    def __init__(self, engine: FakeEngine, request: EngineRequest):
        self.engine = engine
        self.request = request
        self.cancelled = False
        self.finished = False
        self.tokens_sent = 0
        self.failed_with: FolioError | None = None
        self._ended = asyncio.Event()

    async def messages(self):
        p = self.request.params
        budget = p.max_tokens if p.max_tokens is not None else 1000
        prompt = self.request.prompt_token_ids
        last = [prompt[-1]] * p.n
        # Sequence i of n > 1 counts in steps of i + 1 (so sequences differ); n == 1 continues the prompt's
        # own step (1 for "abc"), so a sequence resumed alone from prompt + its tokens continues exactly.
        steps = [i + 1 for i in range(p.n)] if p.n > 1 else [max(1, prompt[-1] - prompt[-2]) if len(prompt) > 1 else 1]
        if self.engine.fail_after == 0:  # e.g. connection refused: not even the first message
            raise EngineFailed(self.engine.error("fake engine failure"))
        yield EngineMessage(sequences=[], queue_s=0.001)
        for step in range(budget):
            if self.engine.fail_after is not None and step >= self.engine.fail_after:
                raise EngineFailed(self.engine.error("fake engine failure"))
            if self.engine.hang_after is not None and step >= self.engine.hang_after:
                await self._ended.wait()  # frozen until the router fails (or cancels) the call
                raise EngineFailed(self.failed_with) if self.failed_with else asyncio.CancelledError()
            await asyncio.sleep(self.engine.delay_s)
            ups = []
            for i in range(p.n):
                last[i] += steps[i]
                if step == self.engine.eos_at:
                    ups.append(SequenceUpdate(i, [EOS_ID], finish_reason="stop", stop_reason=EOS_ID))
                else:
                    ups.append(SequenceUpdate(i, [last[i]], finish_reason="length" if step == budget - 1 else None))
            self.tokens_sent += 1
            done = step == budget - 1 or step == self.engine.eos_at
            yield EngineMessage(sequences=ups, finished=done, cached_tokens=0)
            if done:
                break
        self.finished = True

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled = True
            self._ended.set()

    def fail(self, error: FolioError) -> None:
        if not self.finished:
            self.failed_with = error
            self._ended.set()


class FakeEngineClient:
    def __init__(self, engines: dict[str, FakeEngine]):
        self.engines = engines

    def generate(self, address: str, request: EngineRequest, timeout_s: float | None) -> FakeEngineCall:
        call = FakeEngineCall(self.engines[address], request)
        self.engines[address].calls.append(call)
        return call

    async def close(self) -> None:
        pass


class FakeDetokenizer:
    def __init__(self):
        self.opened_early = False
        self.finished = False
        self.closed = False

    def open_early(self) -> None:
        self.opened_early = True

    async def add(self, token_ids: list[int], flush: bool) -> str:
        return "".join(chr(t) for t in token_ids)

    async def finish(self) -> None:
        self.finished = True

    def close(self) -> None:
        self.closed = True


class FakeTokenizer:
    address = "fake-tokenizer"

    def __init__(self):
        self.model = ""
        self.detokenizers: list[FakeDetokenizer] = []

    async def start(self, wait_s: float) -> None:
        self.model = MODEL

    async def encode(self, *, text=None, messages=None, add_special_tokens=True, add_generation_prompt=True,
                     timeout_s=None) -> list[int]:
        return [ord(c) for c in text]

    async def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(chr(t) for t in token_ids)

    def detokenizer(self, skip_special_tokens: bool) -> FakeDetokenizer:
        self.detokenizers.append(FakeDetokenizer())
        return self.detokenizers[-1]

    async def close(self) -> None:
        pass


class FakeRegistry:
    """Chooses engines in the order given, skipping excluded ones; records what the router told it.
    `predict` guesses the same engine (as the real registry nearly always does), or `wrong_guess` when set."""

    def __init__(self, engine_ids: list[str]):
        self.engine_ids = engine_ids
        self.wrong_guess: str | None = None
        """Predict this engine (a cached view that disagrees with Redis's choice)."""
        self.view = []
        self.redis_ok = True
        self.released: list[tuple[str, str]] = []
        self.suspects: list[str] = []

    async def refresh(self) -> None:
        pass

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def models(self) -> dict:
        return {}

    async def choose(self, model, request_id, blocks, exclude=frozenset()):
        for e in self.engine_ids:
            if e not in exclude:
                return FakeChoice(e, e)
        return None

    def predict(self, model, exclude=frozenset()):
        if self.wrong_guess is not None:
            return FakeChoice(self.wrong_guess, self.wrong_guess)
        return next((FakeChoice(e, e) for e in self.engine_ids if e not in exclude), None)

    async def release(self, engine_id: str, request_id: str) -> None:
        self.released.append((engine_id, request_id))

    def mark_suspect(self, engine_id: str) -> None:
        self.suspects.append(engine_id)


async def _start_without_watch(core: RouterCore) -> None:
    """Start the core, but not its watch task: asyncio.run's loop ends here (see `watching`)."""
    start, core.watch.start = core.watch.start, lambda: None
    try:
        await core.start()
    finally:
        core.watch.start = start


@dataclass
class FakeRouter:
    core: RouterCore
    engines: dict[str, FakeEngine]
    registry: FakeRegistry
    tokenizer: FakeTokenizer


def make_router(max_attempts: int = 3, hung_after_s: float = 4.0, **engines: FakeEngine) -> FakeRouter:
    """A RouterCore over fake engines (named by keyword, chosen in that order) and a fake tokenizer; its
    engine watch runs (and judges fake engines, which never report steps, by `hung_after_s`) in each
    request's event loop (`watching`)."""
    registry, tokenizer = FakeRegistry(list(engines)), FakeTokenizer()
    watch = EngineWatch(registry, hung_after_s=hung_after_s, first_step_s=hung_after_s, interval_s=0.02)
    core = RouterCore(registry, FakeEngineClient(engines), [tokenizer], max_attempts=max_attempts, watch=watch)
    asyncio.run(_start_without_watch(core))
    return FakeRouter(core, engines, registry, tokenizer)


__all__ = ["FakeEngine", "make_router", "MODEL", "ResourceExhausted", "Unavailable"]
