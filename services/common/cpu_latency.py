"""Holds this host's CPU wake-up latency down while a service has requests in flight
(`--cpu-wake-latency-us`, router and engine).

A first token crosses several threads of several processes (docs/router.md), and each crossing wakes a
thread that was asleep. On a VM whose idle vCPUs halt (the H200 host's idle driver is haltpoll), waking a
halted vCPU costs ~0.2 ms (bench/grpc_hops.py), paid at nearly every crossing. Linux's PM QoS interface
lets a process ask that no CPU enter an idle state slower to leave than N microseconds, for as long as it
holds /dev/cpu_dma_latency open with N written to it; at 0 an idle CPU polls (the cpuidle poll state)
instead of halting, so a wake-up is a flag the polling CPU sees at once. The price is that idle CPUs stay
busy (power, and a VM's vCPUs keep their host cores), host-wide: so the request is made only while
requests are in flight (`hold()`), and lifted `linger_s` after the last one ended (so the next request at
a moderate rate finds it on), and it ends with the process in any case. Needs write access to the file
(root, as a rule); without it the service logs why and runs as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time

log = logging.getLogger("folio.cpu_latency")

PATH = "/dev/cpu_dma_latency"
NO_LIMIT_US = 2_000_000_000
"""The kernel's default for the request (PM_QOS_CPU_LATENCY_DEFAULT_VALUE): no constraint."""
LINGER_S = 1.0


class CpuWakeLatency:
    """An open PM QoS request: `hold()` (a context) asks for `latency_us` while any hold is open and `linger_s`
    after the last; otherwise the request asks nothing. `close()` (or the process's exit) ends it."""

    def __init__(self, fd: int, latency_us: int, linger_s: float = LINGER_S):
        self.fd = fd
        self.latency_us = latency_us
        self.linger_s = linger_s
        self.held = 0
        self.on = False
        self._until = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def _write(self, us: int) -> None:
        if self.fd >= 0:
            os.write(self.fd, struct.pack("=i", us))  # the kernel reads a 32-bit int (or its decimal text)

    @contextlib.contextmanager
    def hold(self):
        self.held += 1
        if not self.on:
            self._write(self.latency_us)
            self.on = True
        try:
            yield
        finally:
            self.held -= 1
            self._until = time.monotonic() + self.linger_s
            if self.held == 0 and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._lift)

    def _lift(self) -> None:
        """After the linger: lift the request if nothing is in flight and nothing ended since."""
        self._timer = None
        left = self._until - time.monotonic()
        if self.held:
            return
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._lift)
            return
        if self.on:
            self._write(NO_LIMIT_US)
            self.on = False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.on = False


def open_request(latency_us: int, path: str = PATH, linger_s: float = LINGER_S) -> CpuWakeLatency | None:
    """A PM QoS request this service can turn on while requests are in flight (asking nothing until then);
    None (with a warning naming the reason) where the host does not let this process ask."""
    if latency_us < 0:
        raise ValueError(f"cpu_wake_latency_us: must be >= 0 (got {latency_us})")
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        log.warning("cpu_wake_latency_us %d: not held (%s: %s); CPUs idle as the host decides", latency_us, path,
                    e.strerror)
        return None
    try:
        os.write(fd, struct.pack("=i", NO_LIMIT_US))  # open, asking nothing until a request is in flight
    except OSError as e:
        os.close(fd)
        log.warning("cpu_wake_latency_us %d: not held (writing %s: %s)", latency_us, path, e.strerror)
        return None
    log.info("CPU wake-up latency held at <= %d us (%s) while requests are in flight", latency_us, path)
    return CpuWakeLatency(fd, latency_us, linger_s)
