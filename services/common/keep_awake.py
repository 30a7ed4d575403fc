"""Keeps this process's event loop from sleeping while requests are in flight (router --busy-loop, and
engine --busy-loop beside --core-process).

Each hop into a service wakes its event loop from epoll; on a VM host whose idle vCPUs halt, that
wake-up costs ~0.2 ms (bench/grpc_hops.py: a blocked reader against a polling one), paid on every
crossing of a first token. While a request is in flight, and for `linger_s` after the last one ended
(so the next request at a moderate rate finds it awake too), a task here yields to the loop without
pause, so the loop polls instead of sleeping and an arriving message is picked up at once. The price is
one core kept busy meanwhile (never when idle longer than `linger_s`); off by default. With `spinners`
(services/common/cpu_spinners.py), chosen CPUs are kept from halting over the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.cpu_spinners import CpuSpinners

LINGER_S = 1.0
"""How long the loop keeps polling after the last request in flight ended."""
AUTO_MIN_CPUS = 8
"""`worth_a_core()`: a host with fewer CPUs for this process keeps its loop sleeping (a polling loop takes a core
its other services may need: on the 2-core CI machine, polling loops starved an engine)."""


def worth_a_core(min_cpus: int = AUTO_MIN_CPUS) -> bool:
    """Whether this process may run on at least `min_cpus` CPUs: where a polling loop (a core while requests are
    in flight) is the default (router --busy-loop unset)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cpus) >= min_cpus


class KeepAwake:
    def __init__(self, linger_s: float = LINGER_S, spinners: CpuSpinners | None = None):
        self.linger_s = linger_s
        self.spinners = spinners
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
        if self.spinners is not None:
            self.spinners.resume()
        try:
            while self.held > 0 or time.monotonic() < self._until:
                await asyncio.sleep(0)
        finally:
            if self.spinners is not None:
                self.spinners.pause()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.spinners is not None:
            self.spinners.close()
