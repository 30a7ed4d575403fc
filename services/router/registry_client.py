"""The router's side of the Redis registry: choose-and-reserve, release, and a cached view for when Redis is down.

`choose()` runs registry.CHOOSE_LUA (one atomic step). A background task refreshes `view` (every
engine's last report) twice a second; if Redis stops answering, `choose()` falls back to that view
with reservations kept in this process, and `redis_ok` turns false (Stats and logs say so).
Engines that just failed a call are "suspect" for a short while and skipped, so requests do not
queue up behind a dead engine whose registry entry has not expired yet. `predict()` names, from the
cached view and without I/O, the engine `choose()` must return when only one qualifies, so the router
can start the engine call while Redis decides (services/router/request_stream.py, docs/router.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from services.common import registry
from services.common.registry import EngineRecord

log = logging.getLogger("folio.router.registry")


@dataclass
class Choice:
    engine_id: str
    address: str
    score: int
    from_cache: bool = False


class RegistryClient:
    def __init__(self, redis, stale_ms: int = 1500, reservation_ttl_ms: int = 10_000, suspect_s: float = 2.0,
                 refresh_s: float = 0.5):
        self.redis = redis
        self.stale_ms = stale_ms
        self.reservation_ttl_ms = reservation_ttl_ms
        self.suspect_s = suspect_s
        self.refresh_s = refresh_s
        self._choose = redis.register_script(registry.CHOOSE_LUA)
        self.view: list[EngineRecord] = []
        self.view_time = 0.0
        self.redis_ok = True
        self._suspects: dict[str, float] = {}
        self._local_resv: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._closed = False
        self._models: dict[str, list[EngineRecord]] = {}
        self._models_of: list[EngineRecord] | None = None  # the view `_models` was built from

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="registry-refresh")

    async def close(self, timeout_s: float = 2.0) -> None:
        """Stop the refresh loop (it gets `timeout_s`: a router's stop must not wait on it for ever)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                log.warning("the registry refresh did not stop within %.1fs; closing without it", timeout_s)

    def _set_ok(self, ok: bool, err: Exception | None = None) -> None:
        if ok != self.redis_ok:
            if ok:
                log.info("Redis reachable again; routing on live state")
            else:
                log.warning("Redis unreachable (%s); routing on the last known view from %.1fs ago",
                            err, time.monotonic() - self.view_time if self.view_time else float("nan"))
        self.redis_ok = ok

    async def refresh(self) -> None:
        try:
            engines, now = await registry.read_engines(self.redis)
        except Exception as e:  # noqa: BLE001
            registry.raise_if_cancelled(e)
            self._set_ok(False, e)
            return
        self._set_ok(True)
        self.view = [e for e in engines if now - e.ts_ms <= self.stale_ms]
        self.view_time = time.monotonic()
        self._local_resv.clear()

    async def _refresh_loop(self) -> None:
        while not self._closed:
            await self.refresh()
            if not self._closed:
                await asyncio.sleep(self.refresh_s)

    def mark_suspect(self, engine_id: str) -> None:
        self._suspects[engine_id] = time.monotonic() + self.suspect_s

    def _current_suspects(self) -> set[str]:
        now = time.monotonic()
        for k in [k for k, t in self._suspects.items() if t < now]:
            del self._suspects[k]
        return set(self._suspects)

    def models(self) -> dict[str, list[EngineRecord]]:
        """The view's engines by model (built once per view: every request asks, several times)."""
        if self._models_of is not self.view:
            out: dict[str, list[EngineRecord]] = {}
            for e in self.view:
                out.setdefault(e.model, []).append(e)
            self._models, self._models_of = out, self.view
        return self._models

    async def choose(self, model: str, request_id: str, blocks: int, exclude: set[str] = frozenset()) -> Choice | None:
        """Pick the engine with the most headroom and reserve `blocks` on it; None if no engine qualifies."""
        excluded = set(exclude) | self._current_suspects()
        try:
            r = await self._choose(keys=[registry.engines_key(model)],
                                   args=[request_id, blocks, self.stale_ms, self.reservation_ttl_ms, *sorted(excluded)])
        except Exception as e:  # noqa: BLE001 - fall back to the cached view
            registry.raise_if_cancelled(e)  # (a request cancelled mid-command: not an outage)
            self._set_ok(False, e)
            return self._choose_cached(model, blocks, excluded)
        self._set_ok(True)
        if not r:
            return None
        return Choice(engine_id=r[0], address=r[1], score=int(r[2]))

    def predict(self, model: str, exclude: set[str] = frozenset(), max_age_s: float = 1.0) -> Choice | None:
        """The engine `choose` will pick when the cached view leaves it no other (no I/O, nothing
        reserved): the one live engine of the model that is not excluded or suspect. None when several
        qualify (a guess could be wrong, and a wrong guess costs its engine a request admitted and
        aborted: a prefill for nothing), when none does, or when the view is older than `max_age_s` or
        Redis is unreachable."""
        if not self.redis_ok or time.monotonic() - self.view_time > max_age_s:
            return None
        excluded = set(exclude) | self._current_suspects()
        left = [e for e in self.view if e.model == model and e.engine_id not in excluded]
        if len(left) != 1:
            return None
        return Choice(left[0].engine_id, left[0].address, left[0].available_blocks)

    def _choose_cached(self, model: str, blocks: int, excluded: set[str]) -> Choice | None:
        best = None
        for e in self.view:
            if e.model != model or e.engine_id in excluded:
                continue
            score = e.available_blocks - self._local_resv.get(e.engine_id, 0)
            if best is None or score > best[0]:
                best = (score, e)
        if best is None:
            return None
        e = best[1]
        self._local_resv[e.engine_id] = self._local_resv.get(e.engine_id, 0) + blocks
        return Choice(e.engine_id, e.address, best[0], from_cache=True)

    async def release(self, engine_id: str, request_id: str) -> None:
        """Drop a reservation whose request never reached the engine."""
        try:
            await self.redis.hdel(registry.reserved_key(engine_id), request_id)
        except Exception:  # noqa: BLE001 - it expires anyway
            pass
