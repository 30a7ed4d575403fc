"""Must-show 7: `make run` brings the stack up SERVING, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from folio.stack import ROOT, free_port
from tests.integration.helpers import generate, params

pytestmark = pytest.mark.timeout(400)


def session_members(sid: int) -> list[tuple[int, str]]:
    """Processes whose session id is `sid` (everything `make run` started, however deep)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append((int(d.name), stat[stat.index("(") + 1:stat.rindex(")")]))
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_comes_up_serving_and_ctrl_c_leaves_no_process():
    port, http_port = free_port(), free_port()  # not 8000, the default: another run on this machine may hold it
    args = f"--port {port} --http-port {http_port} --cpu-kv-cache-bytes 134217728 --max-model-len 2048"
    # -o: treat the venv as up to date (`make test` has just installed it; a bare pytest run must not pip install).
    p = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "run", f"ARGS={args}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in p.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops everything" in l for l in seen):
            assert p.poll() is None, "make run exited early:\n" + "".join(seen)
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail("make run did not come up within 240s:\n" + "".join(seen))
        out = "".join(seen)
        assert f"router     grpc://127.0.0.1:{port}" in out and "complete" in out
        res = generate(f"127.0.0.1:{port}", text="The capital of France is", params=params(temperature=0, max_tokens=3))
        assert res.text[0] == " Paris.\n"
        assert f"http       http://127.0.0.1:{http_port}" in out  # the OpenAI-compatible API, from the router
        import httpx

        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                       json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " Paris.\n"
        members = session_members(p.pid)
        names = " ".join(n for _, n in members)
        assert len(members) >= 6 and "redis-server" in names, members  # make, folio up, redis, tokenizer, engine, router

        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C at the terminal does: SIGINT to the foreground process group
        p.wait(60)
        deadline = time.monotonic() + 30
        while session_members(p.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_members(p.pid)
        assert not left, f"processes left behind after Ctrl-C: {left}"
    finally:
        for pid, _ in session_members(p.pid):  # never leak into the rest of the suite
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
