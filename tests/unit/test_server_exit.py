"""A SIGTERMed service leaves in bounded time even when something keeps the interpreter from exiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

SERVER = r"""
import asyncio, threading, time
import services.common.server as server
server.EXIT_MARGIN_S = 0.5
threading.Thread(target=time.sleep, args=(3600,)).start()  # a non-daemon thread: exit would wait on it forever
async def main():
    s = server.GrpcServer(["test.Service"])
    await s.run(0.2, on_ready=lambda: asyncio.sleep(0, print("ready", flush=True)))
asyncio.run(main())
"""


def test_a_process_that_cannot_exit_after_drain_leaves_within_grace_plus_margin():
    p = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(20)
        took = time.monotonic() - t0
    finally:
        p.kill()
    assert rc == 1, "left by the guard, not by a normal exit"
    assert took < 0.2 + 0.5 + 5, took
    assert "exiting now" in p.stderr.read()
