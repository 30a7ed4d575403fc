"""The registry publisher's leave() on drain ends its heartbeat even when the Redis client swallows the cancel.

redis-py can turn a cancellation that lands mid-command into a ConnectionError (seen when Redis went away
during a drain under load): the heartbeat task then kept looping and the engine's drain waited for it until
its 30 s grace ran out. A fake Redis stands in for the client here (the real-process drain is
tests/integration/test_tracing.py's dead-collector test, which only hit this race under load).
"""

from __future__ import annotations

import asyncio
import time

from services.common.engine_load import EngineLoad
from services.engine.publisher import RegistryPublisher


def _run(coro):
    """Run `coro` on a fresh loop without waiting on leftover tasks at the end (a heartbeat that swallows
    cancels, the bug under test, would hang asyncio.run's clean-up instead of failing the test)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class _Engine:
    snapshot = EngineLoad(total_blocks=8, free_blocks=8)

    def take_admitted(self) -> list[str]:
        return []


class _RedisThatSwallowsCancels:
    """Each script call blocks; a cancel that lands in it comes out as a ConnectionError (as redis-py's can)."""

    released = False

    def __init__(self):
        self.calls = 0
        self.deleted: list[str] = []
        self.in_call = asyncio.Event()

    def register_script(self, _lua):
        async def script(keys, args):
            self.calls += 1
            self.in_call.set()
            if self.released:  # the test is over: answer at once so the loop can close either way
                return
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise ConnectionError("Connection closed by server.") from None
        return script

    async def delete(self, key):
        self.deleted.append(key)

    async def srem(self, key, member):
        pass


def test_leave_ends_a_heartbeat_whose_cancel_the_client_turned_into_an_error():
    async def main():
        redis = _RedisThatSwallowsCancels()
        pub = RegistryPublisher(redis, _Engine(), "e0", "127.0.0.1:1", "m", 64, interval_s=0.05, ttl_s=1.0)
        pub.start()
        await asyncio.wait_for(redis.in_call.wait(), 5)
        t0 = time.monotonic()
        await asyncio.wait({asyncio.create_task(pub.leave())}, timeout=3.0)
        took = time.monotonic() - t0
        calls_at_leave = redis.calls
        await asyncio.sleep(0.2)  # a heartbeat still running would call the script again by now
        calls_after = redis.calls
        redis.released = True
        return pub, redis, took, calls_at_leave, calls_after

    pub, redis, took, calls_at_leave, calls_after = _run(main())
    assert took < 1.0, f"leave() took {took:.2f}s: the heartbeat outlived its cancel"
    assert calls_after == calls_at_leave, "the heartbeat went on publishing after leave()"
    assert redis.deleted, "leave() did not remove the engine's registry entry"


class _RedisThatNeverAnswers(_RedisThatSwallowsCancels):
    """A script call that ignores cancels altogether (a client stuck in C, say): leave() must still return."""

    def register_script(self, _lua):
        async def script(keys, args):
            self.calls += 1
            self.in_call.set()
            while not self.released:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue
        return script


def test_leave_is_bounded_even_if_the_heartbeat_never_ends():
    async def main():
        redis = _RedisThatNeverAnswers()
        pub = RegistryPublisher(redis, _Engine(), "e0", "127.0.0.1:1", "m", 64, interval_s=0.05, ttl_s=1.0)
        pub.start()
        await asyncio.wait_for(redis.in_call.wait(), 5)
        t0 = time.monotonic()
        await asyncio.wait({asyncio.create_task(pub.leave(timeout_s=0.3))}, timeout=3.0)
        took = time.monotonic() - t0
        deleted = list(redis.deleted)
        redis.released = True  # let the abandoned heartbeat end so the loop can close
        pub._task.cancel()
        await asyncio.wait({pub._task}, timeout=5)
        return took, deleted

    took, deleted = _run(main())
    assert 0.25 < took < 2.0, f"leave() took {took:.2f}s against its 0.3 s bound"
    assert deleted, "leave() did not remove the engine's registry entry after the bound"
