"""router --busy-loop (services/common/keep_awake.py): while a request is in flight (and briefly after) the
event loop polls (never sleeps in its selector), and then it sleeps again; requests stream as without it."""

from __future__ import annotations

import asyncio

import pytest

from services.common.sampling_params import SamplingParams
from services.common.keep_awake import KeepAwake
from services.router.messages import GenerateInput
from tests.unit.router_fakes import FakeEngine, make_router


def _record_select_timeouts(loop: asyncio.AbstractEventLoop) -> list:
    timeouts = []
    select = loop._selector.select

    def recording(timeout=None):
        timeouts.append(timeout)
        return select(timeout)

    loop._selector.select = recording
    return timeouts


def test_the_loop_polls_while_held_and_sleeps_again_after():
    async def run():
        timeouts = _record_select_timeouts(asyncio.get_running_loop())
        awake = KeepAwake(linger_s=0.005)
        with awake.hold():
            timeouts.clear()
            await asyncio.sleep(0.02)  # a timer to wait for: a sleeping loop would block in select for it
            held = list(timeouts)
        await asyncio.sleep(0.01)  # past the linger: the spinning task ends
        timeouts.clear()
        await asyncio.sleep(0.02)
        awake.close()
        return held, list(timeouts)

    held, after = asyncio.run(run())
    assert len(held) > 5 and all(t == 0 for t in held), held[:10]
    assert any(t is None or t > 0.001 for t in after), after


def test_a_router_with_a_busy_loop_streams_the_same_and_stops_spinning_after():
    r = make_router(a=FakeEngine())
    r.core.keep_awake = KeepAwake(linger_s=0.005)
    inp = GenerateInput(params=SamplingParams(temperature=0, max_tokens=8), prompt="abc", request_id="r1")

    async def run():
        out = [c async for c in r.core.generate(inp)]
        await asyncio.sleep(0.02)
        return out, r.core.keep_awake.held, r.core.keep_awake._task.done()

    out, held, done = asyncio.run(run())
    assert [t for c in out for ch in c.choices for t in ch.token_ids] == list(range(100, 108))
    assert held == 0 and done


def test_the_loop_keeps_polling_for_the_linger_after_the_last_request():
    async def run():
        timeouts = _record_select_timeouts(asyncio.get_running_loop())
        awake = KeepAwake(linger_s=0.5)
        with awake.hold():
            pass
        timeouts.clear()
        await asyncio.sleep(0.02)  # well within the linger: the next request would find the loop awake
        awake.close()
        return list(timeouts)

    within = asyncio.run(run())
    assert len(within) > 5 and all(t == 0 for t in within), within[:10]


def test_engine_busy_loop_needs_a_core_process():
    """A polling loop beside the in-process step thread would take its GIL: refused, naming the field."""
    from services.engine.server import EngineServerConfig

    with pytest.raises(ValueError, match="busy_loop: needs core_process"):
        EngineServerConfig(busy_loop=True)
    assert EngineServerConfig(busy_loop=True, core_process=True).busy_loop


def test_busy_loop_unset_polls_only_where_the_host_has_the_cpus(monkeypatch):
    """router --busy-loop unset: on with 8 or more CPUs for the process, off below (the 2-core CI machine)."""
    import os

    from services.common import keep_awake
    from services.router.server import parse_config

    assert parse_config([]).busy_loop is None
    assert parse_config(["--busy-loop"]).busy_loop is True
    assert parse_config(["--no-busy-loop"]).busy_loop is False
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert keep_awake.worth_a_core()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert not keep_awake.worth_a_core()
