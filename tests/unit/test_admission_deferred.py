"""AsyncEngine's admissions hand their loop work over only once the next step is launched
(services/engine/async_engine.py `_flush_later`, LLMEngine.after_launch): the caller's add_request returns
after the launch, the registry report the admission calls for comes then too, in order, and an engine
that launches nothing (no `after_launch` call) still answers after its step. A scripted engine stands in
for LLMEngine (no model)."""

from __future__ import annotations

import asyncio
import threading
import time

from services.common.engine_load import EngineLoad
from services.common.sampling_params import SamplingParams
from services.engine.async_engine import AsyncEngine


class LaunchingEngine:
    """Each step: 5 ms of host work ("prepare"), then the launch (after_launch), then 20 ms of waiting for
    the device; records when each launch happened. `calls_hook`: False for an engine that never does."""

    def __init__(self, calls_hook: bool = True):
        self.calls_hook = calls_hook
        self.after_launch = None
        self.requests: set[str] = set()
        self.launched: list[int] = []
        self.blocks = type("B", (), {"num_blocks": 10})()
        self.step_phase, self.step_batch = "idle", (0, 0)
        self.lock = threading.Lock()

    def get_stats(self):
        return EngineLoad(total_blocks=10, free_blocks=10, waiting=len(self.requests))

    def has_unfinished_requests(self):
        return bool(self.requests)

    def add_request(self, request_id, prompt, params, prompt_token_ids=None):
        self.requests.add(request_id)

    def abort_request(self, request_id):
        self.requests.discard(request_id)

    def step(self):
        time.sleep(0.005)
        self.launched.append(time.monotonic_ns())
        if self.calls_hook and self.after_launch is not None:
            self.after_launch()
        time.sleep(0.02)
        return []


def _run(calls_hook: bool):
    async def main():
        eng = LaunchingEngine(calls_hook)
        reports: list[int] = []
        a = AsyncEngine(eng, on_change=lambda snap: reports.append(time.monotonic_ns()), first_token_handoff_s=0)
        a.start()
        try:
            await asyncio.sleep(0.05)  # idle: the first report (nothing waiting) is out
            reports.clear()
            sent = time.monotonic_ns()
            await asyncio.wait_for(a.add_request("r", [1], SamplingParams(max_tokens=4)), 5)
            returned = time.monotonic_ns()
            return eng, sent, returned, reports
        finally:
            await a.stop()
    return asyncio.run(main())


def test_add_request_returns_once_the_next_step_is_launched_not_before():
    eng, sent, returned, reports = _run(calls_hook=True)
    launched = [t for t in eng.launched if t > sent]
    assert launched and launched[0] < returned, "the reply came before the step that follows the admission launched"
    # ... and during that step's wait for the device (20 ms), not after the step returned
    assert returned - launched[0] < 15e6
    # the registry report the admission called for (waiting 0 -> 1) comes with it, after the launch
    assert reports and launched[0] < reports[0]


def test_an_engine_that_launches_nothing_still_answers_after_its_step():
    eng, sent, returned, reports = _run(calls_hook=False)
    launched = [t for t in eng.launched if t > sent]
    assert launched and returned - launched[0] >= 15e6  # after the step's end (its 20 ms wait), as a backstop
    assert reports
