"""Tasks whose first step runs at once, in the caller's turn of the event loop (Python 3.12+'s eager tasks).

A request's own work on the router is a chain of tasks (the chunk producer, the engine call's send); each
created the usual way waits for the loop's next turn before its first step, and on a host whose loop turns
are slow that is ~0.05-0.1 ms per task on the first token's way. Started eagerly, the engine request is
on the wire before the handler's first step ends. Before 3.12 these are ordinary tasks.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine

EAGER = sys.version_info >= (3, 12)


def start(coro: Coroutine) -> asyncio.Task:
    """`coro` as a task, run until its first suspension now (3.12+), else at the loop's next turn."""
    if EAGER:
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)
    return asyncio.ensure_future(coro)
