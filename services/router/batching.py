"""Chunks that are ready together go to the client as one: a request's stream, batched while its reader is busy.

The router reads an engine's messages and writes the client's chunks on one event loop. Read in lock
step (a generator chain), every engine message costs one client write, and while the loop is busy with
other streams each stream's messages wait in line one by one: the queueing that grows with load. Here a
request's chunks are made by their own task as engine messages arrive, and the client side takes what
is there: one chunk when one is ready (handed over at once, no waiting for a second), or all that
accumulated while the previous write was in progress, merged into one (`Chunk.extend`), so a lagging
client or a loaded loop costs one write per turn instead of one per token. A chunk handed to a waiting
reader is written before the producing task reads on.

With `first_inline`, the first chunk is made in the reader's own task, in lock step: a hand-over between
tasks waits for a turn of the event loop, behind whatever other streams queued before it (0.15-0.26 ms
of a first token at 4-16 req/s on the H200 host); only the chunks after it come from the producing task.
The source then runs in two tasks one after the other, so it must not hold context variables across its
first chunk (the router's RequestStream holds a tracing span: inline only while tracing is off).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from services.common import eager
from services.router.messages import Chunk


async def batched(chunks: AsyncIterator[Chunk], first_inline: bool = False) -> AsyncIterator[Chunk]:
    """`chunks`, with those that pile up between two reads merged. Errors come after the chunks before
    them; closing this (the client went away) cancels the producing task, which ends the engine call.
    `first_inline`: the first chunk is read in this task (module docstring)."""
    if first_inline:
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            return
        except BaseException:
            await chunks.aclose()
            raise
        try:
            yield first
        except BaseException:  # the reader left (GeneratorExit) or failed: end the source now
            await chunks.aclose()
            raise
    pending: Chunk | None = None
    error: BaseException | None = None
    done = False
    ready = asyncio.Event()

    async def produce() -> None:
        nonlocal pending, error, done
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    if pending is None:
                        pending = chunk
                        ready.set()
                        # Let the reader take it first: reading on (the next engine message's set-up)
                        # would otherwise come before this chunk's write (~0.1-0.2 ms of a first token
                        # on the H200 host). Chunks that come while the reader writes are merged.
                        await asyncio.sleep(0)
                    else:
                        pending.extend(chunk)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, in order
            error = e
            if not isinstance(e, Exception):
                raise  # this task was cancelled (the reader left) or the stream raised CancelledError
        finally:
            done = True
            ready.set()

    task = eager.start(produce())
    try:
        while True:
            if pending is None and not done:
                ready.clear()
                await ready.wait()
            if pending is not None:
                chunk, pending = pending, None
                yield chunk
            elif done:
                if error is not None:
                    raise error
                return
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
