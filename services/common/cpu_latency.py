"""Holds this host's CPU wake-up latency down while a service runs (`--cpu-wake-latency-us`, router and engine).

A first token crosses several threads of several processes (docs/router.md), and each crossing wakes a
thread that was asleep. On a VM whose idle vCPUs halt (the H200 host's idle driver is haltpoll), waking a
halted vCPU costs ~0.2 ms (bench/grpc_hops.py), paid at nearly every crossing. Linux's PM QoS interface
lets a process ask that no CPU enter an idle state slower to leave than N microseconds, for as long as it
holds /dev/cpu_dma_latency open with N written to it; at 0 an idle CPU polls (the cpuidle poll state)
instead of halting, so a wake-up is a flag the polling CPU sees at once. The price is that idle CPUs stay
busy (power, and a VM's vCPUs keep their host cores), for the whole host and only while the file is held:
the request ends when the process exits. Needs write access to the file (root, as a rule); without it the
service logs why and runs as before.
"""

from __future__ import annotations

import logging
import os
import struct

log = logging.getLogger("folio.cpu_latency")

PATH = "/dev/cpu_dma_latency"


class CpuWakeLatency:
    """A held PM QoS request (`hold`); `release()` (or the process's exit) ends it."""

    def __init__(self, fd: int, latency_us: int):
        self.fd = fd
        self.latency_us = latency_us

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def hold(latency_us: int, path: str = PATH) -> CpuWakeLatency | None:
    """Ask that no CPU of this host take longer than `latency_us` to wake, while the returned handle is open;
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
        os.write(fd, struct.pack("=i", latency_us))  # the kernel reads a 32-bit int (or its decimal text)
    except OSError as e:
        os.close(fd)
        log.warning("cpu_wake_latency_us %d: not held (writing %s: %s)", latency_us, path, e.strerror)
        return None
    log.info("holding this host's CPU wake-up latency at <= %d us (%s) while this service runs", latency_us, path)
    return CpuWakeLatency(fd, latency_us)
