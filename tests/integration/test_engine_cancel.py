"""Cancellation that cannot be lost, on a real engine process (issue 13): clients that leave before, during
or right after admission (a deadline expiring while the admission waits behind a long step; a call
cancelled right after it is sent) leave the engine with nothing running or waiting within a few
seconds; a direct client's n beyond the engine's max_num_seqs is refused naming the field; the largest
n it takes forks in one step and is aborted at once, and the engine answers Stats throughout."""

from __future__ import annotations

import time

import grpc
import pytest

from protos.gen.folio.v1 import engine_pb2
from tests.integration.helpers import engine_stats, engine_stub, params, random_prompt, start_engine_only, wait_for

pytestmark = pytest.mark.timeout(240)

MAX_NUM_SEQS = 64


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    stack = start_engine_only(tmp_path_factory, "cancel", engine_args=[
        "--num-kv-blocks", "256", "--max-model-len", "1024", "--dtype", "float32", "--device", "cpu",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", "1024"])
    try:
        yield stack.engine_addresses[0]
    finally:
        stack.stop()


def _idle(addr: str) -> bool:
    s = engine_stats(addr)
    return s.running + s.waiting == 0


def _request(i: int, n: int = 1, prompt_len: int = 32, max_tokens: int = 64) -> engine_pb2.EngineGenerateRequest:
    return engine_pb2.EngineGenerateRequest(
        request_id=f"cancel-{i}-{time.monotonic_ns()}", prompt_token_ids=random_prompt(prompt_len, seed=i),
        params=params(max_tokens=max_tokens, ignore_eos=True, n=n, temperature=1.0))


def test_clients_gone_before_during_and_after_admission_leave_no_work(engine):
    ch, stub = engine_stub(engine)
    try:
        calls = []
        for round_ in range(2):
            # Long prefills (1000 tokens each) keep the engine thread busy, so the short-deadline calls
            # below wait for admission behind a step when their deadline expires.
            calls += [stub.Generate(_request(100 * round_ + k, prompt_len=600), timeout=1.5) for k in range(2)]
            for i in range(20):
                calls.append(stub.Generate(_request(100 * round_ + 10 + i), timeout=0.01 + 0.01 * (i % 5)))
            for i in range(10):  # gone right after sending
                c = stub.Generate(_request(100 * round_ + 50 + i))
                c.cancel()
        # And after admission: mid-stream cancels.
        for i in range(5):
            c = stub.Generate(_request(900 + i))
            next(c)
            c.cancel()
        codes = []
        for c in calls:
            try:
                for _ in c:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
        t0 = time.monotonic()
        wait_for(lambda: _idle(engine), timeout=10, interval=0.1,
                 what="the engine to drop every request whose client left")
        print(f"\nengine idle {time.monotonic() - t0:.2f}s after the last client left")
    finally:
        ch.close()


def test_n_is_bounded_by_the_engine_and_a_large_fork_is_aborted_at_once(engine):
    ch, stub = engine_stub(engine)
    try:
        with pytest.raises(grpc.RpcError) as e:
            next(stub.Generate(_request(1, n=MAX_NUM_SEQS + 1), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "n:" in e.value.details() and "max_num_seqs" in e.value.details()

        call = stub.Generate(_request(2, n=MAX_NUM_SEQS, max_tokens=500), timeout=60)
        first = next(call)  # the prompt computed, forked into all n samples
        assert len(first.sequences) == MAX_NUM_SEQS
        t0 = time.monotonic()
        call.cancel()
        wait_for(lambda: _idle(engine), timeout=5, interval=0.05, what="the n-sample request to be aborted")
        took = time.monotonic() - t0
        s = engine_stats(engine)
        assert s.free_blocks + s.evictable_blocks == s.total_blocks
        print(f"\nn={MAX_NUM_SEQS} aborted {took:.2f}s after the cancel")
    finally:
        ch.close()
