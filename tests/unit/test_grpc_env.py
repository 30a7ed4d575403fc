"""Each service's entry point puts gRPC's core settings in the environment before grpc is imported
(services/common/grpc_env.py): grpc reads them once, at import, so set later they would do nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.common import grpc_env

PROBE = r"""
import os, runpy, sys
sys.argv = ["x", "--help"]
seen = {}
real = __import__("services.common.grpc_env", fromlist=["set_defaults"]).set_defaults
def spy():
    seen["grpc imported before"] = "grpc" in sys.modules
    real()
import services.common.grpc_env as g
g.set_defaults = spy
try:
    runpy.run_module("services.%s", run_name="__main__")
except SystemExit:
    pass
print(seen.get("grpc imported before"), os.environ.get("GRPC_EXPERIMENTS"))
"""


@pytest.mark.parametrize("service", ["router", "engine", "tokenizer"])
def test_each_service_sets_grpc_experiments_before_importing_grpc(service):
    out = subprocess.run([sys.executable, "-c", PROBE % service], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"}, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", grpc_env.GRPC_EXPERIMENTS]


def test_a_value_already_set_is_kept(monkeypatch):
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")
    grpc_env.set_defaults()
    import os

    assert os.environ["GRPC_EXPERIMENTS"] == ""
