"""A step failing with a fatal error (e.g. a broken tensor-parallel group) ends the engine loop: every
request in flight gets the error, `on_fatal` is told, and nothing more is stepped. A non-fatal failure
ends only the requests in flight and the loop goes on (fake engine: this is the loop's rule alone)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.common.engine_load import EngineLoad
from services.common.sampling_params import SamplingParams
from services.engine.async_engine import AsyncEngine, EngineFailure


class Broken(RuntimeError):
    fatal = True


class FakeEngine:
    def __init__(self, error: Exception):
        self.error, self.steps, self.requests = error, 0, set()
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
        self.steps += 1
        raise self.error


@pytest.mark.parametrize("fatal", [True, False])
def test_a_fatal_step_error_stops_the_loop_and_tells_the_server(fatal):
    async def main():
        eng = FakeEngine(Broken("group broken") if fatal else RuntimeError("one bad step"))
        told = asyncio.Event()
        seen = []
        a = AsyncEngine(eng, on_fatal=lambda e: (seen.append(e), told.set()))
        a.start()
        q = await a.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=2))
        assert isinstance(await asyncio.wait_for(q.get(), 5), EngineFailure)
        if fatal:
            await asyncio.wait_for(told.wait(), 5)
            assert seen == [a.fatal] and str(a.fatal) == "group broken"
            await asyncio.sleep(0.3)  # the loop is gone: nothing is stepped any more
            assert eng.steps == 1
        else:
            q2 = await a.add_request("r2", [1], SamplingParams(max_tokens=2))
            assert isinstance(await asyncio.wait_for(q2.get(), 5), EngineFailure)
            assert eng.steps == 2 and a.fatal is None and not seen
        await a.stop()

    asyncio.run(main())
