"""Through router, tokenizer and engine: the same tokens and text as the offline API; cancellation frees blocks."""

from __future__ import annotations

import time

import grpc
import pytest

from folio import SamplingParams
from protos.gen.folio.v1 import common_pb2, router_pb2
from tests.integration.helpers import (
    engine_stats, generate, params, random_prompt, router_stub, wait_for,
)

pytestmark = pytest.mark.timeout(300)


def test_greedy_text_matches_offline(stack, offline_llm):
    """Must-show 1: a greedy stream returns exactly the offline API's text and token ids."""
    prompt = "The capital of France is"
    want = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    got = generate(stack.router_address, text=prompt, params=params(temperature=0, max_tokens=24))
    assert got.token_ids[0] == want.outputs[0].token_ids
    assert got.text[0] == want.outputs[0].text
    assert got.text[0].startswith(" Paris.\n\nThe answer is: 2018-01-22")  # FACTS.md reference
    assert got.finish[0] == common_pb2.FINISH_REASON_LENGTH
    assert got.usage.prompt_tokens == 5 and got.usage.completion_tokens == 24
    assert list(got.messages[0].prompt_token_ids) == [504, 3575, 282, 4649, 314]
    assert len(got.messages) > 3, "the output must stream, not arrive in one message"


def test_chat_with_logprobs_matches_offline(stack, offline_llm):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    want = offline_llm.chat(messages, SamplingParams(temperature=0, max_tokens=32, logprobs=2), use_tqdm=False)[0]
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="What is 2+2?")])
    got = generate(stack.router_address, chat=chat, params=params(temperature=0, max_tokens=32, logprobs=2))
    w = want.outputs[0]
    assert got.token_ids[0] == w.token_ids
    assert got.text[0] == w.text == "The answer to this classic math problem is 4."
    assert got.finish[0] == common_pb2.FINISH_REASON_STOP  # EOS
    assert len(got.logprobs[0]) == len(w.token_ids)
    for pos, entry in zip(got.logprobs[0], w.logprobs):
        assert pos.entries[0].token_id == next(iter(entry))  # the sampled token comes first
        assert {e.token_id for e in pos.entries} == set(entry)
        for e in pos.entries:
            assert e.logprob == pytest.approx(entry[e.token_id].logprob, abs=1e-4)


def test_stop_string_and_seeded_sampling_match_offline(stack, offline_llm):
    sp = SamplingParams(temperature=0, max_tokens=24, stop=["answer"])
    want = offline_llm.generate("The capital of France is", sp, use_tqdm=False)[0].outputs[0]
    got = generate(stack.router_address, text="The capital of France is",
                   params=params(temperature=0, max_tokens=24, stop=["answer"]))
    assert got.text[0] == want.text == " Paris.\n\nThe "
    assert got.stop_str[0] == "answer" and got.finish[0] == common_pb2.FINISH_REASON_STOP

    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, n=2, max_tokens=12)
    want = offline_llm.generate("San Francisco is a", sp, use_tqdm=False)[0]
    got = generate(stack.router_address, text="San Francisco is a",
                   params=params(temperature=0.9, top_p=0.95, seed=1234, n=2, max_tokens=12))
    for o in want.outputs:
        assert got.token_ids[o.index] == o.token_ids
        assert got.text[o.index] == o.text
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)


def test_cancelled_stream_frees_blocks_within_a_second(stack):
    """Must-show 4: a client cancel aborts the request on the engine; Stats show the blocks back."""
    # Precondition: the engines are idle (the previous test's streams may still be settling: an
    # abort after a router-side stop string lands within a step, which is slow on a loaded machine).
    deadline = time.monotonic() + 10
    while True:
        before = {a: engine_stats(a) for a in stack.engine_addresses}
        if all(s.running == 0 and s.waiting == 0 for s in before.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for s in before.values():
        assert s.running == 0 and s.waiting == 0
    ch, stub = router_stub(stack.router_address)
    req = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=random_prompt(200, seed=4)),
                                     params=params(temperature=0, max_tokens=500, ignore_eos=True))
    call = stub.Generate(req, timeout=120)
    first = next(call)
    engine = first.engine_id
    assert engine in before
    for _ in range(3):
        next(call)
    during = engine_stats(engine)
    assert during.running == 1
    avail = lambda s: s.free_blocks + s.evictable_blocks  # noqa: E731
    assert avail(during) <= avail(before[engine]) - 13  # 200 prompt tokens hold 13 blocks
    t0 = time.monotonic()
    call.cancel()
    wait_for(lambda: (s := engine_stats(engine)).running == 0 and avail(s) == avail(before[engine]),
             timeout=1.0, what="the engine to free the cancelled request's blocks")
    elapsed = time.monotonic() - t0
    ch.close()
    assert elapsed < 1.0
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_reaches_the_engine(stack):
    ch, stub = router_stub(stack.router_address)
    req = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=random_prompt(64, seed=5)),
                                     params=params(temperature=0, max_tokens=500, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.Generate(req, timeout=1.5):
            pass
    ch.close()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: all(engine_stats(a).running == 0 for a in stack.engine_addresses), timeout=2.0,
             what="engines to abort the request whose deadline passed")


def test_list_models_and_health(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch, stub = router_stub(stack.router_address)
    models = stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).models
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].engines == 2 and models[0].max_model_len == 1024
    stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
    assert stats.redis_ok and len(stats.engines) == 2
    for addr, service in [(stack.router_address, "folio.v1.Router"), (stack.tokenizer_address, "folio.v1.Tokenizer"),
                          (stack.engine_addresses[0], "folio.v1.Engine")]:
        with grpc.insecure_channel(addr) as hch:
            r = health_pb2_grpc.HealthStub(hch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    ch.close()


def test_first_token_path_stamps_every_hop_in_order(stack):
    """The last message carries the first token's way through the processes (Timing.first_token_path):
    every hop, each instant no earlier than the one before, all between the client's send and the first
    token's arrival (one CLOCK_MONOTONIC on one host). bench/serving.py splits TTFT with it."""
    want = ["router.handler", "router.received", "router.engine_call", "engine.received", "engine.admitted", "engine.scheduled",
            "engine.first_token", "engine.dequeued", "engine.sent", "router.engine_msg", "router.chunk_ready",
            "router.sent"]
    ch, stub = router_stub(stack.router_address)
    try:
        sent = time.monotonic_ns()
        first = None
        for m in stub.Generate(router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=random_prompt(20, seed=7)),
                                                          params=params(temperature=0, max_tokens=4)), timeout=120):
            if first is None and any(c.token_ids for c in m.choices):
                first = time.monotonic_ns()
            last = m
    finally:
        ch.close()
    path = {s.hop: s.monotonic_ns for s in last.timing.first_token_path}
    assert [s.hop for s in last.timing.first_token_path if s.hop in want] == want
    times = [sent] + [path[h] for h in want] + [first]
    assert times == sorted(times), list(zip(["client.sent", *want, "client.received"], times))
    # add_request returned to the handler after the engine thread admitted the request
    assert path["engine.admitted"] <= path["engine.add_returned"] <= path["engine.dequeued"]
    # the router's own TTFT is the span its stamps bound
    ttft_ns = last.timing.time_to_first_token_ns
    assert path["router.received"] + ttft_ns == pytest.approx(path["router.chunk_ready"], abs=2e6)


def test_requests_over_the_fast_lane_match_grpc(stack):
    """The router sends its requests over the engines' fast lanes (services/common/fast_lane.py, the default) once
    an opened call has named them, the real engine's thread writing each first message: the same tokens as the
    engine's own gRPC stream gives, and each engine names its lane in the opening's metadata (the real engine
    process's `serve` wiring)."""
    from protos.gen.folio.v1 import engine_pb2
    from services.common.fast_lane import METADATA_KEY
    from tests.integration.helpers import engine_stub

    ch, stub = router_stub(stack.router_address)
    with ch:
        addresses = [e.address for e in stub.Stats(router_pb2.RouterStatsRequest(), timeout=30).engines]
    assert sorted(addresses) == sorted(stack.engine_addresses)
    ech, estub = engine_stub(addresses[0])
    with ech:
        call = estub.GenerateStream(iter(()))
        lane = dict(call.initial_metadata()).get(METADATA_KEY)
        call.cancel()
        want = [t for m in estub.Generate(engine_pb2.EngineGenerateRequest(
            request_id="lane-ref", prompt_token_ids=[20, 21, 22],
            params=params(max_tokens=6, temperature=0, ignore_eos=True)), timeout=60)
            for s in m.sequences if s.index == 0 for t in s.token_ids]
    assert lane and lane.rsplit(":", 1)[1].isdigit()
    assert len(want) == 6
    for _ in range(4):  # (on a fresh router the first rides gRPC and opens calls ahead, which name the lanes)
        got = generate(stack.router_address, token_ids=router_pb2.TokenIds(ids=[20, 21, 22]),
                       params=params(max_tokens=6, temperature=0, ignore_eos=True))
        assert got.token_ids[0] == want
        time.sleep(0.2)
