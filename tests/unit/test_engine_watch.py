"""Hung-engine detection (services/router/engine_watch.py): the heartbeat's step counter and call traffic
as progress, the deadlines, and a frozen engine's streams resuming elsewhere (fake clients, on CPU)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from services.common.engine_load import EngineLoad
from services.common.sampling_params import SamplingParams
from services.router.engine_watch import EngineWatch
from services.router.messages import GenerateInput
from tests.unit.router_fakes import FakeEngine, make_router


class _View:
    """A registry whose view the test writes (as the Redis refresh would)."""

    def __init__(self):
        self.view = []
        self.redis_ok = True
        self.view_time = time.monotonic()

    def set(self, now: float, **loads: EngineLoad) -> None:
        self.view = [SimpleNamespace(engine_id=k, load=v) for k, v in loads.items()]
        self.view_time = now


def _watch(view, **kw) -> EngineWatch:
    return EngineWatch(view, hung_after_s=kw.pop("hung_after_s", 4.0), first_step_s=kw.pop("first_step_s", 60.0), **kw)


def test_stuck_counter_with_work_is_hung_after_the_deadline_and_recovers_when_it_moves():
    view, t = _View(), time.monotonic()
    w = _watch(view)
    failed = []
    w.track("e1", failed.append)
    view.set(t, e1=EngineLoad(running=2, steps=10))
    assert w.check(t) == []
    view.set(t + 3.9, e1=EngineLoad(running=2, steps=10))
    assert w.check(t + 3.9) == [] and w.hung() == set()
    view.set(t + 4.2, e1=EngineLoad(running=2, steps=10))
    assert w.check(t + 4.2) == ["e1"] and w.hung() == {"e1"}
    assert len(failed) == 1 and failed[0].status == "UNAVAILABLE" and "no progress" in str(failed[0])
    assert w.check(t + 5) == []  # found once
    view.set(t + 6, e1=EngineLoad(running=2, steps=11))  # SIGCONT: the counter moves again
    w.check(t + 6)
    assert w.hung() == set()


def test_moving_counter_or_idle_engine_is_never_hung():
    view, t = _View(), time.monotonic()
    w = _watch(view)
    w.track("e1", lambda e: None)
    for k in range(20):  # 10 s of steps
        view.set(t + k * 0.5, e1=EngineLoad(running=3, steps=k), e2=EngineLoad(steps=7))
        assert w.check(t + k * 0.5) == []
    for k in range(20, 40):  # an idle engine's counter stands still: not a hang
        view.set(t + k * 0.5, e1=EngineLoad(steps=20), e2=EngineLoad(steps=7))
        assert w.check(t + k * 0.5) == []


def test_busy_engine_without_calls_from_this_router_is_still_avoided():
    view, t = _View(), time.monotonic()
    w = _watch(view)
    view.set(t, e1=EngineLoad(waiting=5, steps=3))
    w.check(t)
    view.set(t + 4.5, e1=EngineLoad(waiting=5, steps=3))
    assert w.check(t + 4.5) == ["e1"]


def test_first_step_gets_the_warm_up_allowance():
    view, t = _View(), time.monotonic()
    w = _watch(view, first_step_s=30.0)
    view.set(t, e1=EngineLoad(running=1, steps=0))
    w.check(t)
    view.set(t + 20, e1=EngineLoad(running=1, steps=0))
    assert w.check(t + 20) == []
    view.set(t + 31, e1=EngineLoad(running=1, steps=0))
    assert w.check(t + 31) == ["e1"]


def test_a_stale_view_is_not_evidence():
    """With Redis down the view stops changing: that alone must not make every busy engine hung."""
    view, t = _View(), time.monotonic()
    w = _watch(view)
    view.set(t, e1=EngineLoad(running=1, steps=5))
    w.check(t)
    assert w.check(t + 10) == []  # view_time is 10 s old: nothing judged from it


def test_frozen_engine_mid_stream_resumes_elsewhere_with_every_token_once():
    r = make_router(hung_after_s=0.3, a=FakeEngine(hang_after=3), b=FakeEngine())

    async def go():
        r.core.watch.start()
        try:
            t0 = time.monotonic()
            chunks = [c async for c in r.core.generate(
                GenerateInput(params=SamplingParams(temperature=0, max_tokens=8), prompt="abc", request_id="r1"))]
            return chunks, time.monotonic() - t0
        finally:
            await r.core.watch.close()

    chunks, took = asyncio.run(go())
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == "defghijk"  # 3 tokens from a, 5 from b: none lost, none repeated
    assert [c.engine_id for c in chunks if c.engine_id] == ["a", "b"]
    assert r.engines["a"].calls[0].failed_with is not None
    assert r.engines["b"].calls[0].request.prompt_token_ids == [97, 98, 99, 100, 101, 102]
    assert 0.3 < took < 2.0
    assert r.core.watch.hung() == {"a"}
