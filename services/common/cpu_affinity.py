"""Runs a service's threads on the CPUs it is given (`--cpus`, router and engine; Linux).

A first token crosses threads that sleep between messages (docs/router.md): the router's event loop and
its gRPC completion-queue poller thread, the engine's. On a VM host whose idle vCPUs halt, waking a thread
on another, idle CPU costs ~0.2 ms (bench/grpc_hops.py). Pinned to one CPU of its own, a service's poller
thread wakes its event loop on the same CPU (a context switch, no cross-CPU wake-up). Not measured on the
H200 yet; there the threads already rarely move between CPUs (0-0.9 migrations per request, session 9), so
it is not about cold caches after a move. Off by default: which CPUs are free is the deployment's to say.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("folio.cpu_affinity")

MAX_CPUS = 8192
"""CPU numbers at or past this are refused (the kernel's largest NR_CPUS)."""


def parse_cpus(spec: str, field: str = "cpus") -> set[int]:
    """A Linux CPU list ("15", "0-13", "0-3,8,10-11") as a set; ValueError naming `field` when it is not one,
    or names a CPU this process may not run on."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{field}: {spec!r} is not a CPU list (e.g. '15', '0-13' or '0-3,8')")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"{field}: {part.strip()!r} is an empty range")
        if b >= MAX_CPUS:
            raise ValueError(f"{field}: CPU {b} is past the largest CPU number allowed ({MAX_CPUS - 1})")
        cpus.update(range(a, b + 1))
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise ValueError(f"{field}: CPU(s) {_ranges(cpus - usable)} are not among this process's usable CPUs "
                         f"({_ranges(usable)})")
    return cpus


def pin_process(cpus: set[int]) -> int:
    """Every thread of this process (and so every thread they start later) runs on `cpus` only. Returns the
    number of threads pinned."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)  # (Linux: a thread id is a pid here)
            n += 1
        except (ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
            continue
    log.info("%d threads pinned to CPU(s) %s", n, _ranges(cpus))
    return n


def _ranges(cpus: set[int]) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
