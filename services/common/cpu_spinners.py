"""Keeps chosen CPUs from halting while requests are in flight (router --poller-cpu, --awake-cpus; Linux).

On a VM whose idle vCPUs halt (the H200 host: no cpuidle driver, so /dev/cpu_dma_latency changes nothing there;
services/common/cpu_latency.py), a thread woken on a halted vCPU waits ~0.1-0.2 ms for the hypervisor to run that
vCPU again (bench/grpc_hops.py: a blocked reader against a polling one), and a message through grpc.aio wakes its
completion-queue poller thread once or twice. Here one process per chosen CPU spins on that CPU alone at the
SCHED_IDLE policy: the CPU never halts, and an ordinary thread woken there preempts the spinner at once (the
scheduler always runs a normal task before an idle-policy one), so the wake costs a context switch on a running
vCPU instead of a halted vCPU's exit. The spinners run only while `resume()`d (`keep_awake.KeepAwake` resumes
them while the event loop polls: requests in flight, and a second after) and are stopped (SIGSTOP) otherwise, so
an idle service leaves the host alone; they die with the process that started them.

`pin_grpc_poller(cpu)` puts grpc.aio's poller thread (the thread that waits in gRPC core for the completion
queue's events and hands them to the event loop) on one such CPU.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

log = logging.getLogger("folio.cpu_spinners")

_SPIN = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: end with the service
if os.getppid() != int(sys.argv[2]):  # the service ended before the line above
    sys.exit(0)
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
os.kill(os.getpid(), signal.SIGSTOP)  # stopped until resumed
while True:
    pass
"""


class CpuSpinners:
    """One idle-priority spinner process per CPU in `cpus`, stopped until `resume()`."""

    def __init__(self, cpus: set[int]):
        self.cpus = sorted(cpus)
        self.running = False
        self.procs: list[subprocess.Popen] = []
        for cpu in self.cpus:
            self.procs.append(subprocess.Popen([sys.executable, "-S", "-E", "-c", _SPIN, str(cpu), str(os.getpid())],
                                               stdin=subprocess.DEVNULL, close_fds=True))
        for p in self.procs:  # each stops itself once it is on its CPU at idle priority
            _, status = os.waitpid(p.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                self.close()
                raise RuntimeError(f"a CPU spinner exited during its start (wait status {status})")
        log.info("CPU spinners ready on CPU(s) %s (running while requests are in flight)",
                 ",".join(map(str, self.cpus)))

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    def resume(self) -> None:
        if not self.running:
            self._signal(signal.SIGCONT)
            self.running = True

    def pause(self) -> None:
        if self.running:
            self._signal(signal.SIGSTOP)
            self.running = False

    def close(self) -> None:
        self._signal(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        self.running = False


def grpc_poller_threads() -> list[threading.Thread]:
    """grpc.aio's completion-queue poller thread(s) in this process (started with its first server or channel)."""
    return [t for t in threading.enumerate()
            if getattr(getattr(t, "_target", None), "__name__", "") == "_poll_wrapper" and t.native_id]


def pin_grpc_poller(cpu: int) -> int:
    """Run grpc.aio's poller thread(s) on `cpu` only; returns how many were pinned (0: none started yet)."""
    n = 0
    for t in grpc_poller_threads():
        os.sched_setaffinity(t.native_id, {cpu})
        n += 1
    if n:
        log.info("grpc.aio's poller thread on CPU %d", cpu)
    else:
        log.warning("no grpc.aio poller thread found to pin to CPU %d", cpu)
    return n
