"""The engine thread gives the event loop a turn after each step (AsyncEngine's `loop_turn_s`): the loop
finishes handling a step's outputs before the next step takes the GIL. Without the turn, the engine
thread (waiting for the GIL since it woke the loop) takes it at the loop's first release (here a 2 ms
GIL-free call per output, as a socket write is) and holds it for its whole next step. Fake engine whose
step is pure Python holding the GIL (named so), the switch interval set long so nothing else preempts it."""

from __future__ import annotations

import asyncio
import sys
import time
from types import SimpleNamespace

import pytest

from services.common.engine_load import EngineLoad
from services.common.sampling_params import SamplingParams
from services.engine.async_engine import AsyncEngine


class GilHoldingFakeEngine:
    """Each step: `busy_s` of pure Python (the GIL held throughout), then one token for request "r"
    for `steps` steps. Records, at each step's start, how many outputs the consumer had not taken yet."""

    def __init__(self, steps: int, busy_s: float):
        self.left, self.busy_s = steps, busy_s
        self.requests: set[str] = set()
        self.produced = 0
        self.consumed = 0
        self.lag_at_step: list[int] = []
        self.blocks = SimpleNamespace(num_blocks=10)
        self.step_phase, self.step_batch = "idle", (0, 0)

    def get_stats(self):
        return EngineLoad(total_blocks=10, free_blocks=10, running=len(self.requests))

    def has_unfinished_requests(self):
        return bool(self.requests)

    def add_request(self, request_id, prompt, params, prompt_token_ids=None):
        self.requests.add(request_id)

    def abort_request(self, request_id):
        self.requests.discard(request_id)

    def step(self):
        self.lag_at_step.append(self.produced - self.consumed)
        end = time.perf_counter() + self.busy_s
        while time.perf_counter() < end:
            pass
        self.left -= 1
        self.produced += 1
        finished = self.left == 0
        if finished:
            self.requests.clear()
        return [SimpleNamespace(request_id="r", finished=finished)]


def run_steps(loop_turn_s: float, steps: int = 12) -> list[int]:
    async def main():
        eng = GilHoldingFakeEngine(steps, busy_s=0.02)
        a = AsyncEngine(eng, loop_turn_s=loop_turn_s)
        a.start()
        q = await a.add_request("r", [1, 2, 3], SamplingParams(max_tokens=steps))
        while True:
            out = await q.get()  # as the Generate handler does
            time.sleep(0.002)  # the loop's own work on the output releases the GIL for a while
            eng.consumed += 1
            if out.finished:
                break
        await a.stop()
        return eng.lag_at_step

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the loop gets the GIL only when the engine thread lets go of it
    try:
        return asyncio.run(main())
    finally:
        sys.setswitchinterval(old)


@pytest.mark.timeout(120)
def test_each_step_output_is_taken_before_the_next_step_with_a_loop_turn(monkeypatch):
    monkeypatch.setattr(AsyncEngine, "MAX_TURN_S", 10.0)  # a shared CPU may stall the loop past 5 ms
    lags = run_steps(loop_turn_s=0.001)
    assert lags[1:] == [0] * (len(lags) - 1), lags


@pytest.mark.timeout(120)
def test_without_a_turn_the_loop_falls_behind_a_gil_holding_step():
    """The control: the same steps without the turn leave outputs untaken while the next step runs."""
    lags = run_steps(loop_turn_s=0.0)
    assert sum(lag > 0 for lag in lags) >= len(lags) // 2, lags
