"""Keeps this process's event loop from sleeping while requests are in flight (router --busy-loop, and
engine --busy-loop beside --core-process).

Each hop into a service wakes its event loop from epoll; on a VM host whose idle vCPUs halt, that
wake-up costs ~0.2 ms (bench/grpc_hops.py: a blocked reader against a polling one), paid on every
crossing of a first token. While a request is in flight, and for `linger_s` after the last one ended
(so the next request at a moderate rate finds it awake too), a task here yields to the loop without
pause, so the loop polls instead of sleeping and an arriving message is picked up at once. The price is
one core kept busy meanwhile (never when idle longer than `linger_s`); off by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

LINGER_S = 1.0
"""How long the loop keeps polling after the last request in flight ended."""


class KeepAwake:
    def __init__(self, linger_s: float = LINGER_S):
        self.linger_s = linger_s
        self.held = 0
        self._until = 0.0
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def hold(self):
        """The loop stays awake (polling) while any `hold()` is open, and `linger_s` after."""
        self.held += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._spin(), name="keep-awake")
        try:
            yield
        finally:
            self.held -= 1
            self._until = time.monotonic() + self.linger_s

    async def _spin(self) -> None:
        while self.held > 0 or time.monotonic() < self._until:
            await asyncio.sleep(0)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
