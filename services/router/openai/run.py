"""One HTTP request's generations (one core stream per prompt) run concurrently and merged, and
cancelled when the client disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request

from services.router import eager
from services.router.core import Chunk, GenerateInput, RouterCore
from services.router.metrics import RouterMetrics

_background: set[asyncio.Task] = set()


class Run:
    """One HTTP request's generations (one per prompt), run as tasks and merged in arrival order.

    The tasks outlive a cancelled consumer only long enough to be cancelled themselves (`cancel()`),
    which closes each core stream and so the engine call."""

    def __init__(self, core: RouterCore, metrics: RouterMetrics, inputs: list[GenerateInput]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = len(inputs)
        self.buffer: list[tuple[int, Chunk]] = []
        # eager (3.12+): each prompt's engine request goes out before the handler's first step ends
        self.tasks = [eager.start(self._pump(i, core, metrics, inp)) for i, inp in enumerate(inputs)]
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


class ClientGone(Exception):
    """The client disconnected before the response started."""


async def cancel_on_disconnect(request: Request, coro, run: Run):
    """Run `coro`, cancelling it and `run` if the client disconnects first (FastAPI has read the body, so
    the next ASGI message is the disconnect)."""
    task = eager.start(coro)
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
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()
