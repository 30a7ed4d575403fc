"""services/common/cpu_spinners.py: idle-priority spinners that keep chosen CPUs from halting while the router's
loop polls (--poller-cpu, --awake-cpus), and grpc.aio's poller thread pinned to one CPU."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from services.common.cpu_spinners import CpuSpinners, grpc_poller_threads, pin_grpc_poller
from services.common.keep_awake import KeepAwake

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _state_and_cpu_ticks(pid: int) -> tuple[str, int]:
    f = _stat(pid)
    return f[0], int(f[11]) + int(f[12])  # state; utime + stime


def test_spinners_run_at_idle_priority_on_their_cpu_only_while_resumed():
    cpu = max(os.sched_getaffinity(0))
    s = CpuSpinners({cpu})
    try:
        pid = s.procs[0].pid
        assert os.sched_getaffinity(pid) == {cpu}
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert _state_and_cpu_ticks(pid)[0] == "T"  # stopped until resumed
        s.resume()
        time.sleep(0.3)
        state, ticks = _state_and_cpu_ticks(pid)
        assert state == "R" and ticks > 0
        s.pause()
        time.sleep(0.05)
        assert _state_and_cpu_ticks(pid)[0] == "T"
    finally:
        s.close()
    assert all(p.poll() is not None for p in s.procs) or not s.procs


def test_keep_awake_runs_the_spinners_while_the_loop_polls():
    cpu = max(os.sched_getaffinity(0))

    async def run():
        awake = KeepAwake(linger_s=0.01, spinners=CpuSpinners({cpu}))
        with awake.hold():
            await asyncio.sleep(0.01)
            during = awake.spinners.running
        await asyncio.sleep(0.05)  # past the linger: the polling task ended and paused them
        after = awake.spinners.running
        pid = awake.spinners.procs[0].pid
        awake.close()
        return during, after, pid

    during, after, pid = asyncio.run(run())
    assert during and not after
    with pytest.raises(ProcessLookupError):  # closed with the KeepAwake
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.02)


def test_grpc_aio_poller_thread_is_found_and_pinned():
    import grpc

    cpu = min(os.sched_getaffinity(0))

    async def run():
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            threads = grpc_poller_threads()
            n = pin_grpc_poller(cpu)
            return n, [os.sched_getaffinity(t.native_id) for t in threads]
        finally:
            await server.stop(None)

    n, masks = asyncio.run(run())
    assert n >= 1 and masks and all(m == {cpu} for m in masks)


def test_router_flags_need_the_polling_loop():
    from services.router.server import _spinners, parse_config

    assert _spinners(parse_config([]), busy_loop=True) is None
    with pytest.raises(SystemExit, match="polling loop"):
        _spinners(parse_config(["--poller-cpu", "0"]), busy_loop=False)
    with pytest.raises(SystemExit, match="awake-cpus"):
        _spinners(parse_config(["--awake-cpus", "99999"]), busy_loop=True)
