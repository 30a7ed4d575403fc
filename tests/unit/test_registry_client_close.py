"""The router's registry client stops its refresh loop on close() even when the Redis client swallows the cancel.

redis-py can turn a cancellation that lands mid-command into a ConnectionError. The refresh loop rides out Redis
outages by catching errors, so it took that for one, logged "Redis unreachable" and went on refreshing; the
router's close() awaited it for ever, and a stopped router ran until its 40 s exit guard (seen once in the
integration tests; CI's test_no_engine_for_the_model_is_unavailable timed out waiting 30 s for a router's exit).
A fake Redis stands in for the client here, as in test_publisher_leave.py.
"""

from __future__ import annotations

import asyncio
import time

from services.router.registry_client import RegistryClient


class _RedisThatSwallowsCancels:
    """Every read blocks until cancelled, and the cancel comes out as a ConnectionError (as redis-py's can)."""

    def __init__(self):
        self.reads = 0
        self.in_read = asyncio.Event()
        self.released = False

    def register_script(self, _lua):
        async def script(keys, args):
            return await self._block()
        return script

    async def _block(self):
        self.reads += 1
        self.in_read.set()
        if self.released:
            return []
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionError("Connection closed by server.") from None

    def pipeline(self, *a, **kw):  # registry.read_engines's way in (any call blocks the same way)
        return self

    def __getattr__(self, name):
        async def call(*a, **kw):
            return await self._block()
        return call


def _run(coro):
    """A fresh loop, not asyncio.run: a loop that swallows cancels (the bug) would hang asyncio.run's clean-up."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def test_close_ends_a_refresh_loop_whose_cancel_became_a_connection_error():
    async def main():
        redis = _RedisThatSwallowsCancels()
        client = RegistryClient(redis, refresh_s=0.01)
        client.start()
        await asyncio.wait_for(redis.in_read.wait(), 5)
        t0 = time.monotonic()
        closing = asyncio.ensure_future(client.close())
        await asyncio.wait({closing}, timeout=3.0)  # (not wait_for: cancelling a hung close() hangs as well)
        took = time.monotonic() - t0
        reads = redis.reads
        await asyncio.sleep(0.1)  # a loop still running would read again within its 10 ms interval
        redis.released = True
        return took, client._task.done(), reads, redis.reads

    took, done, reads_at_close, reads_later = _run(main())
    assert done and took < 1.0, f"close() took {took:.2f}s; the refresh task done: {done}"
    assert reads_later == reads_at_close, "the refresh loop went on reading Redis after close()"


def test_a_choose_cancelled_mid_command_is_a_cancellation_not_an_outage():
    async def main():
        redis = _RedisThatSwallowsCancels()
        client = RegistryClient(redis)
        task = asyncio.ensure_future(client.choose("m", "req-1", blocks=1))
        await asyncio.wait_for(redis.in_read.wait(), 5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled", client.redis_ok
        return "returned", client.redis_ok

    outcome, redis_ok = _run(main())
    assert outcome == "cancelled" and redis_ok, (outcome, redis_ok)
