"""The engine with its core in a process of its own (`--core-process`, services/engine/core_process.py):
the same text as the offline API through the whole stack, a cancelled stream's blocks back within a
second, the first token's path complete, and no core process left behind when the engine stops. (Not with
`--busy-loop`: on a 2-core machine a polling server and router take the cores the core process steps on, and the
router judges the engine hung; the polling loop itself: tests/unit/test_router_keep_awake.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from folio import SamplingParams
from protos.gen.folio.v1 import common_pb2, router_pb2
from tests.integration.helpers import (
    SMALL_ENGINE, engine_stats, generate, params, random_prompt, router_stub, start_stack, wait_for,
)

pytestmark = pytest.mark.timeout(300)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.fixture(scope="module")
def core_stack(tmp_path_factory):
    s = start_stack(tmp_path_factory, "core", engines=1, engine_args=[*SMALL_ENGINE, "--core-process"])
    yield s
    s.stop()


def test_greedy_text_matches_offline_through_the_core_process(core_stack, offline_llm):
    # before any request, the engine reports its pool (the registry's first report routes by it)
    assert engine_stats(core_stack.engine_addresses[0]).total_blocks == 64
    prompt = "The capital of France is"
    want = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    got = generate(core_stack.router_address, text=prompt, params=params(temperature=0, max_tokens=24, logprobs=1))
    assert got.token_ids[0] == want.outputs[0].token_ids
    assert got.text[0] == want.outputs[0].text
    assert got.finish[0] == common_pb2.FINISH_REASON_LENGTH
    assert len(got.logprobs[0]) == 24 and got.logprobs[0][0].entries[0].decoded_token  # the server's tokenizer
    path = {s.hop for s in got.messages[-1].timing.first_token_path}
    assert {"engine.received", "engine.admitted", "engine.first_token", "engine.dequeued"} <= path
    # bad input is still the engine's answer, through the pipe
    ch, stub = router_stub(core_stack.router_address)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=random_prompt(2000)),
                                                          params=params(max_tokens=4)), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        ch.close()


def test_cancelled_stream_frees_blocks_in_the_core_process(core_stack):
    engine = core_stack.engine_addresses[0]
    before = engine_stats(engine)
    avail = lambda s: s.free_blocks + s.evictable_blocks  # noqa: E731
    ch, stub = router_stub(core_stack.router_address)
    call = stub.Generate(router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=random_prompt(200, seed=4)),
                                                    params=params(temperature=0, max_tokens=500, ignore_eos=True)),
                         timeout=120)
    for _ in range(4):
        next(call)
    assert engine_stats(engine).running == 1
    call.cancel()
    wait_for(lambda: (s := engine_stats(engine)).running == 0 and avail(s) == avail(before),
             timeout=2.0, what="the core to free the cancelled request's blocks")
    ch.close()


def test_the_core_process_ends_with_the_engine(core_stack):
    """Last in this module: stops the stack (the fixture's own stop is then a no-op)."""
    cores = _children(core_stack.proc("engine0").popen.pid)
    assert cores, "the engine server runs its core as a child process"
    core_stack.stop()

    def gone(pid: int) -> bool:
        try:
            return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        except OSError:
            return True

    wait_for(lambda: all(gone(c) for c in cores), timeout=10.0, what="the core process to end with its engine")
