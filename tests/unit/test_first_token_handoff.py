"""The engine thread's hand-over of a step's deltas (services/engine/async_engine.py `_hand_over`): first
tokens reach their readers before the other deltas of the same step, the thread waits for those readers
before its next step (so its next host work does not hold the GIL while the token is sent), and that
wait is bounded when the event loop is busy. A scripted engine stands in for LLMEngine (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from services.common.engine_load import EngineLoad
from services.common.outputs import RequestDelta, SequenceDelta
from services.common.sampling_params import SamplingParams
from services.engine.async_engine import AsyncEngine


class ScriptedEngine:
    """Each step gives every request one token; a request's first step is held back until `release`
    holds its id, so a test decides in which step first tokens come. Records when each step started."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.release: set[str] = set()
        self.step_started: list[int] = []
        self.first_in_step: dict[str, int] = {}  # request -> index of the step that gave its first token
        self.tokens: dict[int, dict[str, int]] = {}  # step index -> {request: its token in that step}
        self.blocks = SimpleNamespace(num_blocks=10)
        self.step_phase, self.step_batch = "idle", (0, 0)
        self.lock = threading.Lock()

    def get_stats(self):
        return EngineLoad(total_blocks=10, free_blocks=10, running=len(self.requests))

    def has_unfinished_requests(self):
        return bool(self.requests)

    def add_request(self, request_id, prompt, params, prompt_token_ids=None):
        self.requests[request_id] = 0

    def abort_request(self, request_id):
        self.requests.pop(request_id, None)

    def step(self):
        self.step_started.append(time.monotonic_ns())
        time.sleep(0.002)
        out = []
        with self.lock:
            for rid, n in list(self.requests.items()):
                if n == 0 and rid not in self.release:
                    continue
                self.requests[rid] = n + 1
                if n == 0:
                    self.first_in_step[rid] = len(self.step_started) - 1
                self.tokens.setdefault(len(self.step_started) - 1, {})[rid] = n + 1
                done = n + 1 >= 50
                if done:
                    del self.requests[rid]
                out.append(RequestDelta(rid, [SequenceDelta(0, [n + 1], None, 0.0, "length" if done else None)], done))
        return out


async def _start(handoff_s: float):
    eng = ScriptedEngine()
    a = AsyncEngine(eng, first_token_handoff_s=handoff_s)
    a.start()
    return eng, a


def test_first_tokens_go_first_and_the_engine_thread_waits_for_their_readers():
    async def main():
        eng, a = await _start(handoff_s=1.0)
        got: list[tuple[str, int, int]] = []  # (request, token, when the reader had it)
        try:
            q_old = await a.add_request("old", [1], SamplingParams(max_tokens=50))
            with eng.lock:
                eng.release.add("old")
            await asyncio.wait_for(q_old.get(), 5)  # "old" is streaming
            q_new = await a.add_request("new", [1], SamplingParams(max_tokens=50))

            async def read(rid, q):
                while True:
                    d = await q.get()
                    got.append((rid, d.sequences[0].token_ids[0], time.monotonic_ns()))
                    if rid == "new" or d.finished:
                        return

            readers = [asyncio.ensure_future(read("old", q_old)), asyncio.ensure_future(read("new", q_new))]
            await asyncio.sleep(0.02)
            with eng.lock:  # "new"'s first token comes in the same step as one of "old"'s
                eng.release.add("new")
            await asyncio.wait_for(readers[1], 5)
            readers[0].cancel()
            new_at = next(i for i, g in enumerate(got) if g[0] == "new")
            step = eng.first_in_step["new"]
            old_at = got.index(("old", eng.tokens[step]["old"], next(
                g[2] for g in got if g[:2] == ("old", eng.tokens[step]["old"]))))
            # the first token's reader ran before the old stream's reader of the same step ...
            assert new_at < old_at, got
            # ... and before the engine thread started its next step
            started_before = [i for i, t in enumerate(eng.step_started) if t < got[new_at][2]]
            assert started_before[-1] == eng.first_in_step["new"]
        finally:
            await a.stop()
    asyncio.run(main())


def test_the_wait_is_bounded_when_the_loop_is_busy():
    async def main():
        eng, a = await _start(handoff_s=0.02)
        try:
            q = await a.add_request("r", [1], SamplingParams(max_tokens=50))
            steps_before = len(eng.step_started)
            with eng.lock:
                eng.release.add("r")
            time.sleep(0.4)  # the loop is blocked: the first token's reader cannot run
            # the engine thread went on stepping after at most ~the bound, not after the loop freed up
            assert len(eng.step_started) - steps_before >= 3
            d = await asyncio.wait_for(q.get(), 5)
            assert d.sequences[0].token_ids == [1]
        finally:
            await a.stop()
    asyncio.run(main())


def test_no_wait_when_off():
    async def main():
        eng, a = await _start(handoff_s=0.0)
        try:
            q = await a.add_request("r", [1], SamplingParams(max_tokens=50))
            with eng.lock:
                eng.release.add("r")
            tokens = []
            while True:
                d = await asyncio.wait_for(q.get(), 5)
                tokens += d.sequences[0].token_ids
                if d.finished:
                    break
            assert tokens == list(range(1, 51))
        finally:
            await a.stop()
    asyncio.run(main())
