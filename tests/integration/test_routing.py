"""Free-block routing through Redis, heartbeat expiry, and engine failures (must-show 2 and 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import pytest

from protos.gen.folio.v1 import common_pb2, engine_pb2, router_pb2
from tests.integration.helpers import (
    engine_stats, engine_stub, generate, generate_in_thread, params, random_prompt, redis_client, router_stub,
    start_stack, wait_for,
)

pytestmark = pytest.mark.timeout(300)

# 40 blocks x 16 tokens per engine: one 480-token prompt leaves an engine nearly full.
POOL = ["--num-kv-blocks", "40", "--max-model-len", "640", "--dtype", "float32", "--device", "cpu",
        "--heartbeat-ttl-s", "1.5"]


@pytest.fixture(scope="module")
def pool_stack(tmp_path_factory):
    """Two equal engines with small pools, shared by the tests below in file order: the herd on fresh engines
    first, then the nearly full engine and the frozen one (which leave both serving), then the drain (which
    ends one engine)."""
    s = start_stack(tmp_path_factory, "routing", engines=2, engine_args=POOL)
    yield s
    s.stop()


def test_router_replicas_do_not_herd_onto_one_engine(pool_stack):
    """Choose-and-reserve is atomic: requests arriving together spread over equal engines."""
    stack = pool_stack
    threads = [generate_in_thread(stack.router_address, token_ids=router_pb2.TokenIds(ids=random_prompt(100, seed=i)),
                                  params=params(temperature=0, max_tokens=2)) for i in range(4)]
    for t, _ in threads:
        t.join(120)
    engines = [res.engine_ids[0] for _, res in threads]
    assert sorted(engines.count(a) for a in stack.engine_addresses) == [2, 2], engines


def test_nearly_full_engine_is_avoided_and_a_silent_engine_leaves_within_its_ttl(pool_stack):
    stack = pool_stack
    full, other = stack.engine_addresses
    r = redis_client(stack)
    # Redis holds each engine's state.
    for addr in (full, other):
        h = r.hgetall(f"folio:engine:{addr}")
        assert h["address"] == addr and h["model"] == "SmolLM2-135M-Instruct" and h["total"] == "40"
        assert 0 < r.pttl(f"folio:engine:{addr}") <= 1500
    assert r.smembers("folio:engines:SmolLM2-135M-Instruct") == {full, other}

    # Fill one engine directly (not through the router) with a long request that keeps decoding.
    ch, stub = engine_stub(full)
    hog = stub.Generate(engine_pb2.EngineGenerateRequest(
        request_id="hog", prompt_token_ids=random_prompt(480, seed=1),
        params=params(temperature=0, max_tokens=150, ignore_eos=True)), timeout=300)
    next(hog)  # prefill done: the engine holds 31 of its 40 blocks
    wait_for(lambda: int(r.hget(f"folio:engine:{full}", "free") or 99) + int(
        r.hget(f"folio:engine:{full}", "evictable") or 99) <= 9, timeout=2, what="the full engine's report")

    results = [generate(stack.router_address, text=f"Question {i}: what is the capital of France?",
                        params=params(temperature=0, max_tokens=4)) for i in range(4)]
    assert [res.engine_ids[0] for res in results] == [other] * 4
    assert all(res.usage.completion_tokens == 4 for res in results)

    # The other engine's heartbeat stops (frozen process): its entry expires within the TTL.
    proc = next(p for p in stack.procs if p.address == other)
    os.kill(proc.popen.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_for(lambda: not r.exists(f"folio:engine:{other}"), timeout=1.5 + 0.3, interval=0.01,
                 what="the frozen engine's registry entry to expire")
        gone_after = time.monotonic() - t0
        res = generate(stack.router_address, text="Hello", params=params(temperature=0, max_tokens=3), timeout=30)
        assert res.engine_ids == [full] and res.usage.completion_tokens == 3
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)
    assert gone_after <= 1.5 + 0.3
    # Back to life: it publishes again and rejoins.
    wait_for(lambda: r.exists(f"folio:engine:{other}"), timeout=3, what="the resumed engine to re-register")
    hog.cancel()
    ch.close()


@pytest.fixture(scope="module")
def failover_module(tmp_path_factory):
    # Engine 0 has the larger pool, so the router prefers it while both are idle.
    s = start_stack(tmp_path_factory, "failover", engines=2, engine_args=["--grace-s", "5"],
                    per_engine_args=[["--num-kv-blocks", "48", "--max-model-len", "640", "--dtype", "float32"],
                                     ["--num-kv-blocks", "40", "--max-model-len", "640", "--dtype", "float32"]])
    yield s
    s.stop()


@pytest.fixture
def failover_stack(failover_module):
    """The failover stack with both engines serving: an engine the test before killed is started again on its
    port (the same address, so the same preferred engine 0), not a whole stack."""
    s = failover_module
    dead = [p for p in s.procs if p.name.startswith("engine") and p.popen.poll() is not None]
    for p in dead:
        s.respawn(p)
    if dead:
        s.wait_serving(dead)
        s.wait_routable()
    return s


def test_engine_killed_before_first_token_request_completes_elsewhere(failover_stack, offline_llm):
    """Must-show 3."""
    stack = failover_stack
    victim, survivor = stack.engine_addresses
    prompt = random_prompt(400, seed=2)  # a prefill of a few hundred ms on CPU: time to kill the engine mid-way
    t, res = generate_in_thread(stack.router_address, token_ids=router_pb2.TokenIds(ids=prompt),
                                params=params(temperature=0, max_tokens=6, ignore_eos=True))
    wait_for(lambda: (s := engine_stats(victim)).running + s.waiting > 0, timeout=10, interval=0.005,
             what="the request to reach the preferred engine")
    assert not res.messages, "the victim must die before the first token"
    proc = next(p for p in stack.procs if p.address == victim)
    proc.popen.kill()
    t.join(120)
    assert res.error is None, res.error
    assert res.engine_ids == [survivor]
    from folio import SamplingParams

    want = offline_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
    assert res.token_ids[0] == want.token_ids
    ch, stub = router_stub(stack.router_address)
    assert stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).retries >= 1
    ch.close()


def test_engine_killed_mid_stream_continues_on_another_without_lost_tokens(failover_stack, offline_llm):
    """After tokens were streamed: prompt + generated tokens go to another engine; one unbroken stream."""
    from folio import SamplingParams

    stack = failover_stack
    victim, survivor = stack.engine_addresses
    ch, stub = router_stub(stack.router_address)
    call = stub.Generate(router_pb2.GenerateRequest(text="The capital of France is",
                                                    params=params(temperature=0, max_tokens=40, ignore_eos=True)),
                         timeout=120)
    tokens, text, engines = [], "", []
    for m in call:
        engines += [m.engine_id] if m.engine_id else []
        for c in m.choices:
            tokens += c.token_ids
            text += c.text
        if len(tokens) >= 5 and len(engines) == 1:
            next(p for p in stack.procs if p.address == engines[0]).popen.kill()
        if m.finished:
            assert m.usage.completion_tokens == 40 and m.usage.prompt_tokens == 5
            assert m.choices[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    ch.close()
    want = offline_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
    assert engines == [victim, survivor]
    assert tokens == want.token_ids
    assert text == want.text


def test_no_live_engine_is_unavailable(failover_stack):
    stack = failover_stack
    for p in stack.procs:
        if p.name.startswith("engine"):
            p.popen.send_signal(signal.SIGTERM)  # drain: each leaves the registry at once
    for p in stack.procs:
        if p.name.startswith("engine"):
            try:
                p.popen.wait(60)  # idle engines leave at once; the grace (5 s) bounds any call in flight
            except subprocess.TimeoutExpired:
                pytest.fail(f"{p.name} still running 60 s after SIGTERM:\n{stack.tail(p)}")
    r = redis_client(stack)
    assert not r.keys("folio:engine:*")
    with pytest.raises(grpc.RpcError) as e:
        generate(stack.router_address, text="Hello", params=params(max_tokens=2), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no live engine" in e.value.details()


def test_sigterm_drains_an_engine(pool_stack):
    """SIGTERM: the engine leaves the registry at once, finishes its requests in flight, then exits. (Last on
    pool_stack: one engine ends here.)"""
    stack = pool_stack
    r = redis_client(stack)
    t, res = generate_in_thread(stack.router_address, text="The capital of France is",
                                params=params(temperature=0, max_tokens=30, ignore_eos=True))
    wait_for(lambda: res.engine_ids, timeout=30, what="the first token")
    draining = res.engine_ids[0]
    other = next(a for a in stack.engine_addresses if a != draining)
    proc = next(p for p in stack.procs if p.address == draining)
    proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: not r.exists(f"folio:engine:{draining}"), timeout=1.0, what="the draining engine to leave")
    assert generate(stack.router_address, text="Hi", params=params(max_tokens=2)).engine_ids == [other]
    t.join(60)
    assert res.error is None and res.engine_ids == [draining]  # finished where it started, no failover
    assert res.usage.completion_tokens == 30
    assert proc.popen.wait(30) == 0
    stack.stop()  # the module's other stack does not wait beside this one
