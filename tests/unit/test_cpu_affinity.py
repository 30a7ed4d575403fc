"""--cpus (router and engine): the CPU list is parsed with errors that name the field, and pinning moves every
thread of the process, those already running and those started later (services/common/cpu_affinity.py)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from services.common.cpu_affinity import parse_cpus, pin_process
from services.engine.server import parse_config as engine_config
from services.router.server import parse_config as router_config

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")


def test_parse_cpu_lists():
    usable = os.sched_getaffinity(0)
    first = min(usable)
    assert parse_cpus(str(first)) == {first}
    assert parse_cpus(",".join(str(c) for c in sorted(usable))) == usable
    lo, hi = min(usable), max(usable)
    if usable == set(range(lo, hi + 1)):
        assert parse_cpus(f"{lo}-{hi}") == usable


@pytest.mark.parametrize("spec, words", [("x", "is not a CPU list"), ("", "is not a CPU list"), ("1-", "is not a CPU list"),
                                         ("3-1", "empty range"), ("0-99999999", "largest CPU number"),
                                         ("8191", "not among this process's usable CPUs")])
def test_bad_cpu_lists_name_the_field(spec, words):
    if spec == "8191" and 8191 in os.sched_getaffinity(0):
        pytest.skip("this host has CPU 8191")
    with pytest.raises(ValueError, match=f"^--cpus: .*{words}"):
        parse_cpus(spec, "--cpus")


def test_pin_process_moves_every_thread_and_later_ones():
    before = os.sched_getaffinity(0)
    one = {min(before)}
    started, stop = threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def running():
        started.set()
        stop.wait(5)
        seen["running"] = os.sched_getaffinity(0)

    t = threading.Thread(target=running)
    t.start()
    started.wait(5)
    try:
        assert pin_process(one) >= 2
        later = threading.Thread(target=lambda: seen.setdefault("later", os.sched_getaffinity(0)))
        later.start()
        later.join()
        stop.set()
        t.join()
        assert os.sched_getaffinity(0) == one
        assert seen == {"running": one, "later": one}
    finally:
        stop.set()
        pin_process(before)
    assert os.sched_getaffinity(0) == before


def test_the_flag_on_both_services():
    assert router_config(["--cpus", "0-3"]).cpus == "0-3"
    assert router_config([]).cpus is None
    _, c = engine_config(["--model", "m", "--cpus", "15"])
    assert c.cpus == "15"


def test_engine_step_thread_on_its_own_cpus():
    """engine --step-cpus: the step thread is moved there; the event loop's thread keeps its CPUs."""
    from services.common.sampling_params import SamplingParams
    from services.engine.async_engine import AsyncEngine
    from tests.unit.test_first_token_handoff import ScriptedEngine

    mine = os.sched_getaffinity(0)
    step_cpus = {max(mine)}
    eng = ScriptedEngine()
    seen = {}
    step = eng.step

    def recording_step():
        seen.setdefault("step", os.sched_getaffinity(0))
        return step()

    eng.step = recording_step

    async def main():
        ae = AsyncEngine(eng, step_cpus=step_cpus)
        ae.start()
        eng.release.add("r")
        await ae.add_request("r", [1, 2], SamplingParams(max_tokens=2))
        for _ in range(200):
            if "step" in seen:
                break
            await asyncio.sleep(0.01)
        await ae.stop()

    asyncio.run(main())
    assert seen["step"] == step_cpus
    assert os.sched_getaffinity(0) == mine


def test_engine_step_cpus_flag():
    _, c = engine_config(["--model", "m", "--cpus", "0", "--step-cpus", "0"])
    assert (c.cpus, c.step_cpus) == ("0", "0")
