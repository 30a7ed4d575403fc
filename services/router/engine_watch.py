"""Hung-engine detection: an engine that has work but makes no progress is "hung"; its streams move elsewhere.

Progress is what an engine visibly does: its step counter (`EngineLoad.steps`, in its heartbeat)
moving, being idle (no running or waiting sequence), or a message arriving on one of this router's
calls to it. An engine with work that shows none of these for `hung_after_s` (or `first_step_s` while
it has never completed a step: a first compile or warm-up) is hung: `RequestStream` stops choosing it,
and each of this router's calls on it is failed with UNAVAILABLE, which takes the same path as a dead
engine's (retry before the first token, resume mid-stream after). It covers the engine whose loop is
wedged while its heartbeat still flows (counter stuck) and the frozen process (SIGSTOP: heartbeat gone,
calls silent), which otherwise holds its streams until the gRPC keepalive gives up (~60 s). An engine
is no longer hung as soon as it shows progress again. See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import FolioError, Unavailable
from services.router.clients import Registry

log = logging.getLogger("folio.router.watch")


@dataclass
class _Engine:
    last_progress: float
    steps: int = -1
    """The step counter last seen in the heartbeat (-1: never seen)."""
    stepped: bool = False
    """Whether it was ever seen to complete a step (after that, `hung_after_s` applies, not `first_step_s`)."""
    calls: dict[int, Callable[[FolioError], None]] = field(default_factory=dict)
    hung_since: float | None = None


class EngineWatch:
    """Watches the engines this router talks to; `run()` checks them every `interval_s`."""

    def __init__(self, registry: Registry, hung_after_s: float = 4.0, first_step_s: float = 120.0,
                 interval_s: float = 0.25, fresh_view_s: float = 2.0):
        self.registry = registry
        self.hung_after_s = hung_after_s
        self.first_step_s = first_step_s
        self.interval_s = interval_s
        self.fresh_view_s = fresh_view_s
        self.engines: dict[str, _Engine] = {}
        self._next_id = 0
        self._task: asyncio.Task | None = None
        self.detections = 0

    # --- what RequestStream tells it --------------------------------------------------------------
    def track(self, engine_id: str, fail: Callable[[FolioError], None]) -> Callable[[], None]:
        """A call on `engine_id` starts; `fail(error)` ends it as failed if the engine hangs. Returns the
        function that stops tracking it."""
        e = self._engine(engine_id)
        self._next_id += 1
        key = self._next_id
        e.calls[key] = fail
        return lambda: e.calls.pop(key, None)

    def progress(self, engine_id: str) -> None:
        """A message arrived from `engine_id`."""
        self._progressed(self._engine(engine_id), time.monotonic())

    def hung(self) -> set[str]:
        """Engines not to choose now."""
        return {k for k, e in self.engines.items() if e.hung_since is not None}

    # --- the check --------------------------------------------------------------------------------
    def _engine(self, engine_id: str) -> _Engine:
        if engine_id not in self.engines:
            self.engines[engine_id] = _Engine(last_progress=time.monotonic())
        return self.engines[engine_id]

    def _progressed(self, e: _Engine, now: float) -> None:
        e.last_progress = now
        e.hung_since = None

    def observe(self, now: float) -> set[str]:
        """Read the registry view (when fresh); returns the engines that have work, by their heartbeat."""
        busy: set[str] = set()
        view_time = getattr(self.registry, "view_time", now)
        if not self.registry.redis_ok or now - view_time > self.fresh_view_s:
            return busy  # an old view says nothing about progress now
        for rec in self.registry.view:
            e = self._engine(rec.engine_id)
            load = rec.load
            if load.steps != e.steps:
                if e.steps != -1:
                    self._progressed(e, now)  # moved (or the engine restarted: its counter reset)
                e.steps = load.steps
            e.stepped = load.steps > 0  # a restarted engine warms up again
            if load.running + load.waiting == 0:
                self._progressed(e, now)
            else:
                busy.add(rec.engine_id)
        return busy

    def check(self, now: float | None = None) -> list[str]:
        """One round: engines newly found hung (their calls failed)."""
        now = time.monotonic() if now is None else now
        busy = self.observe(now)
        found = []
        for engine_id, e in self.engines.items():
            if e.hung_since is not None:
                continue
            if not e.calls and engine_id not in busy:
                e.last_progress = now  # nothing to do is no hang: the clock starts when work does
                continue
            allowed = self.hung_after_s if e.stepped else self.first_step_s
            if now - e.last_progress > allowed:
                e.hung_since = now
                found.append(engine_id)
                self.detections += 1
                err = Unavailable(f"engine {engine_id} made no progress for {now - e.last_progress:.1f}s with work "
                                  "to do (hung or frozen)")
                log.warning("%s; not choosing it, moving its %d streams elsewhere", err, len(e.calls))
                for fail in list(e.calls.values()):
                    fail(err)
        return found

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-watch")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must outlive one bad round
                log.exception("engine watch round failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
