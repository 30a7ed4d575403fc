"""`folio up` heals: a child killed under it is started again on its own port and the stack serves on;
a child that keeps dying stops the stack with a clear message (issue: one dead engine used to stop
the whole local stack)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from folio.stack import ROOT, Proc, free_port
from folio.supervisor import GaveUp, RestartPolicy, Supervisor
from tests.integration.helpers import generate, params
from tests.integration.test_make_run import session_members

pytestmark = pytest.mark.timeout(300)


def _pid_listening_as(sid: int, flag: str, timeout_s: float = 20) -> int:
    """The process of session `sid` whose command line holds `flag` (e.g. an engine's --port N). A child
    just started may still be between fork and exec (its command line the supervisor's) on a loaded
    machine, so this looks again until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        for pid, _ in session_members(sid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "services.engine" in cmd and flag in cmd:
                return pid
        if time.monotonic() > deadline:
            raise LookupError(flag)
        time.sleep(0.1)


def test_folio_up_restarts_a_killed_engine_and_serves_on(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "folio", "up", "--port", str(port), "--no-http", "--log-dir", str(tmp_path),
           "--num-kv-blocks", "64", "--max-model-len", "1024"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in p.stdout], daemon=True).start()
    seen: list[str] = []

    def wait_for(text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in l for l in seen):
            assert p.poll() is None, "folio up exited:\n" + "".join(seen)
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout_s}s:\n" + "".join(seen))

    try:
        wait_for("Ctrl-C stops everything", 180)
        engine_port = next(l for l in seen if "engine 0" in l).rsplit(":", 1)[1].split()[0]
        old = _pid_listening_as(p.pid, f"--port {engine_port}")
        os.kill(old, signal.SIGKILL)
        wait_for("engine0 exited with code", 10)
        wait_for("engine0 restarted", 10)
        assert _pid_listening_as(p.pid, f"--port {engine_port}") != old
        # The stack serves again once the new engine is up and registered (the router retries meanwhile).
        deadline = time.monotonic() + 120
        while True:
            try:
                res = generate(f"127.0.0.1:{port}", text="The capital of France is",
                               params=params(temperature=0, max_tokens=3))
                break
            except Exception:  # noqa: BLE001 - UNAVAILABLE until the restarted engine is routable
                assert time.monotonic() < deadline, "the stack did not serve again:\n" + "".join(seen)
                time.sleep(0.5)
        assert res.text[0] == " Paris.\n"
        assert p.poll() is None
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(60)
        finally:
            for pid, _ in session_members(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# --- the policy, on processes that exit at once ---------------------------------------------------

class _Stack:
    """Just what the Supervisor uses of a Stack, over real short-lived processes."""

    def __init__(self, tmp_path, code: int):
        argv = [sys.executable, "-c", f"raise SystemExit({code})"]
        self.procs = [Proc("engine0", subprocess.Popen(argv), "-", tmp_path / "engine0.log", argv, dict(os.environ))]
        self.respawned = 0

    def respawn(self, p: Proc) -> None:
        p.popen = subprocess.Popen(p.argv)
        self.respawned += 1

    @staticmethod
    def tail(p, n=10) -> str:
        return ""


def test_backoff_doubles_and_repeated_deaths_give_up(tmp_path):
    stack = _Stack(tmp_path, code=3)
    now = [0.0]
    logs: list[str] = []
    sup = Supervisor(stack, RestartPolicy(max_restarts=3, window_s=60, first_backoff_s=1, max_backoff_s=3),
                     log=logs.append, clock=lambda: now[0])
    delays = []
    with pytest.raises(GaveUp, match=r"engine0 exited with code 3, its 4th exit within 60s; giving up"):
        for _ in range(20):
            stack.procs[0].popen.wait()
            sup.check()  # notices the exit
            delays.append(sup.history["engine0"].restart_at - now[0])
            now[0] = sup.history["engine0"].restart_at
            sup.check()  # restarts
    assert delays == [1, 2, 3]  # doubled, capped at max_backoff_s
    assert stack.respawned == 3
    assert any("restarting in 1.0s" in m for m in logs)


def test_deaths_outside_the_window_are_forgotten(tmp_path):
    stack = _Stack(tmp_path, code=1)
    now = [0.0]
    sup = Supervisor(stack, RestartPolicy(max_restarts=1, window_s=10, first_backoff_s=0.5),
                     log=lambda m: None, clock=lambda: now[0])
    for _ in range(5):  # one death every 20 s never exceeds one per 10 s window
        stack.procs[0].popen.wait()
        sup.check()
        now[0] += 20
        sup.check()
    assert stack.respawned == 5
