"""Keeps this process's event loop from sleeping while requests are in flight (router --busy-loop).

Each hop into the router wakes its event loop from epoll; on an idle VM host that wake-up (a halted
vCPU) costs tens to hundreds of microseconds, paid on every crossing of a first token (bench/grpc_hops.py,
its -spin variants). While at least one request is in flight, a task here yields to the loop without
pause, so the loop polls instead of sleeping and an arriving message is picked up at once. The price is
one core kept busy while requests are in flight (never when idle); off by default.
"""

from __future__ import annotations

import asyncio
import contextlib


class KeepAwake:
    def __init__(self):
        self.held = 0
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def hold(self):
        """The loop stays awake (polling) while any `hold()` is open."""
        self.held += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._spin(), name="keep-awake")
        try:
            yield
        finally:
            self.held -= 1

    async def _spin(self) -> None:
        while self.held > 0:
            await asyncio.sleep(0)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
