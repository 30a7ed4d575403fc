"""The router freezes what its start left alive (services/router/server.py `warm_then_freeze`), so a full
collection of the cyclic garbage collector while it serves walks only what serving made since, not the
~200k objects of its modules (grpc, pydantic, and torch + xgrammar from the structured-output warm-up),
which held every request in flight for ~110-170 ms on the CPU machine."""

from __future__ import annotations

import gc
import subprocess
import sys

from services.router.server import warm_then_freeze  # noqa: F401 - the import the check below repeats


def test_after_the_warm_up_a_full_collection_walks_almost_nothing():
    # In a fresh interpreter: what this test process has frozen or not must not decide the result.
    code = ("import gc, time\n"
            "from services.router.server import warm_then_freeze\n"
            "warm_then_freeze()\n"
            "t = time.perf_counter(); gc.collect(); took = time.perf_counter() - t\n"
            "print(gc.get_freeze_count(), len(gc.get_objects()), took)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    frozen, tracked, took = out.stdout.split()
    assert int(frozen) > 50_000  # the modules' objects (torch alone brings ~100k)
    assert int(tracked) < 5_000
    assert float(took) < 0.02  # against ~0.1 s without the freeze on this machine
