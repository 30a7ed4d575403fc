"""Publishes this engine's KV state to the Redis registry: a heartbeat every interval, sooner on large changes.

Each report is one Lua call (services/common/registry.py): it rewrites the engine's hash with the
Redis server's time, renews its TTL (so an engine that stops reporting leaves routing within the
TTL), registers the engine under its model, and drops the reservations of the requests this report
now counts. If Redis is unreachable the engine keeps serving and keeps retrying.
"""

from __future__ import annotations

import asyncio
import logging

from services.common import registry
from services.common.engine_load import EngineLoad
from services.engine.async_engine import AsyncEngine

log = logging.getLogger("folio.engine.publisher")


class RegistryPublisher:
    def __init__(self, redis, aengine: AsyncEngine, engine_id: str, address: str, model: str,
                 max_model_len: int, interval_s: float = 0.2, ttl_s: float = 2.0):
        if ttl_s <= interval_s:
            raise ValueError(f"heartbeat_ttl_s ({ttl_s}) must exceed heartbeat_interval_s ({interval_s})")
        self.redis = redis
        self.aengine = aengine
        self.engine_id = engine_id
        self.address = address
        self.model = model
        self.max_model_len = max_model_len
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self._script = redis.register_script(registry.PUBLISH_LUA)
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ok = True
        self._leaving = False
        """Set by `leave`: the heartbeat loop ends at its next turn even if a cancellation was swallowed."""
        self.reports = 0

    def notify(self, snap: EngineLoad) -> None:
        """A large change: report now rather than at the next heartbeat (called on the event loop)."""
        self._kick.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-publisher")

    async def publish_once(self) -> None:
        admitted = self.aengine.take_admitted()
        load = self.aengine.snapshot  # read after taking the ids: it already counts them
        record = registry.EngineRecord(engine_id=self.engine_id, address=self.address, model=self.model,
                                       max_model_len=self.max_model_len, load=load)
        items = [x for kv in record.to_hash().items() for x in kv]
        keys = [registry.engine_key(self.engine_id), registry.engines_key(self.model),
                registry.reserved_key(self.engine_id), registry.MODELS_KEY]
        try:
            await self._script(keys=keys, args=[self.ttl_ms, self.engine_id, self.model, len(items), *items, *admitted])
        except Exception as e:  # noqa: BLE001 - Redis down: keep serving, retry next beat
            registry.raise_if_cancelled(e)  # (seen with the server going away during a drain)
            if self._ok:
                log.warning("cannot publish to Redis (%s); will keep retrying", e)
            self._ok = False
            return
        if not self._ok:
            log.info("publishing to Redis again")
        self._ok = True
        self.reports += 1

    async def _run(self) -> None:
        while not self._leaving:
            await self.publish_once()
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval_s)
                # Report at once (kicks that came in the same turn make one report). Admissions' kicks come
                # once their step is launched (AsyncEngine._flush_later), while the engine thread waits for
                # the device; a report held 10 ms had landed just where a new request's first token is
                # read back and handed over, holding the GIL that hand-over needs (docs/router.md).
                await asyncio.sleep(0)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Stop reporting and leave the registry now (drain), so routers stop choosing this engine; the
        heartbeat loop gets `timeout_s` to end (a drain must not wait on it for ever)."""
        self._leaving = True
        if self._task is not None:
            self._task.cancel()
            self._kick.set()
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                log.warning("the registry heartbeat did not stop within %.1fs; leaving without it", timeout_s)
            elif not self._task.cancelled() and self._task.exception() is not None:
                log.debug("registry heartbeat ended with %r", self._task.exception())
        try:
            await self.redis.delete(registry.engine_key(self.engine_id))
            await self.redis.srem(registry.engines_key(self.model), self.engine_id)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot leave the registry (%s); the entry expires by its TTL", e)
