"""One HTTP request's generations (one core stream per prompt) run concurrently and merged, and
cancelled when the client disconnects; `EventStream`, the streamed response over them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from services.common import telemetry
from services.common import eager
from services.router.core import Chunk, GenerateInput, RouterCore
from services.router.metrics import RouterMetrics
from services.router.openai.errors import from_exception

_background: set[asyncio.Task] = set()


class Run:
    """One HTTP request's generations (one per prompt), run as tasks and merged in arrival order.

    The tasks outlive a cancelled consumer only long enough to be cancelled themselves (`cancel()`),
    which closes each core stream and so the engine call. One generation (the common case) is read in
    the consumer's own task instead (`inline`): each hand-over between tasks waits for a turn of the event
    loop, behind whatever else is queued there, on a first token's way. Not while tracing: the request's
    span must stay in one task (as services/router/batching.py)."""

    def __init__(self, core: RouterCore, metrics: RouterMetrics, inputs: list[GenerateInput]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = len(inputs)
        self.buffer: list[tuple[int, Chunk]] = []
        self.inline = None
        self.tasks: list[asyncio.Task] = []
        if len(inputs) == 1 and not telemetry.enabled():
            self.inline = metrics.track(core.generate(inputs[0]))
            return
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

    async def close(self) -> None:
        """End every generation (the engine calls with them); a no-op for finished ones."""
        self.cancel()
        if self.inline is not None:
            self.pending = 0
            await self.inline.aclose()

    async def _next(self) -> tuple[int, Chunk] | None:
        if self.inline is not None:
            if not self.pending:
                return None
            try:
                return 0, await anext(self.inline)
            except StopAsyncIteration:
                self.pending = 0
                return None
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
        if self.inline is not None:
            if (first := await self._next()) is not None:
                self.buffer.append(first)
            return
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
            await self.close()  # no-op when all finished; on a disconnect, ends the engine calls


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


class EventStream(Response):
    """A streamed (server-sent events) response over a `Run`, in the request's own task: it waits for every
    generation's first chunk (an error before it is an HTTP status, as `from_exception` maps it), then
    writes `events` as they come. A client that disconnects ends it, and with it the run, at once.
    (Starlette's StreamingResponse writes from a task of its own in an anyio task group, started behind a
    turn of the event loop, after the handler's own wait for the first chunk in another task.)"""

    media_type = "text/event-stream"

    def __init__(self, run: Run, events: AsyncIterator[str]):  # (no body: Response's own would set content-length)
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        self.run = run
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        gone = False
        started = done = False

        async def watch():  # (the body was read: the next message is the disconnect)
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not done:  # (once the last write is out, uvicorn answers receive() with a disconnect too)
                gone = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            try:
                await self.run.started()
            except Exception as e:  # noqa: BLE001 - before the stream started: a real HTTP status
                done = True
                await from_exception(e)(scope, receive, send)
                return
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: nothing more to write
            if not started:
                await Response(status_code=499)(scope, receive, send)  # (counted; nobody reads it)
        finally:
            watcher.cancel()
            await self.events.aclose()
            await self.run.close()
