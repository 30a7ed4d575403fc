"""Asynchronous scheduling (docs/engine.md) gives the synchronous loop's outputs, on the bundled model.

Each test runs the same requests on one engine with `async_scheduling` off, then on, and compares
tokens, finish reasons, text and logprobs: greedy and seeded samples, stop strings, stop token ids,
max_tokens, n > 1, penalties (the synchronous fallback), an abort mid-stream and preemption. Each
also checks that the asynchronous run did overlap steps, so a loop that quietly ran in series fails.
"""

import pytest

from folio import LLM, SamplingParams
from services.engine.request import PENDING


def overlap_counter(engine) -> list[int]:
    """Counts the steps after which a launched step was left in flight (resolved by the next one)."""
    count = [0]
    step = engine.step

    def spy():
        deltas = step()
        count[0] += engine._inflight is not None
        return deltas

    engine.step = spy
    return count


def each_mode(engine):
    """Yields False (sync), then True (async), restoring the engine's own setting afterwards."""
    original = engine.async_scheduling
    try:
        for mode in (False, True):
            engine.async_scheduling = mode
            yield mode
    finally:
        engine.async_scheduling = original
        engine.__dict__.pop("step", None)  # overlap_counter's spy


def summary(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs] for o in outs]


def assert_close_logprobs(a, b):
    for oa, ob in zip(a, b):
        for ca, cb in zip(oa.outputs, ob.outputs):
            assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-4)
            if ca.logprobs is not None:
                assert [sorted(e) for e in ca.logprobs] == [sorted(e) for e in cb.logprobs]
                for ea, eb in zip(ca.logprobs, cb.logprobs):
                    for t in ea:
                        assert (ea[t].logprob, ea[t].rank) == pytest.approx((eb[t].logprob, eb[t].rank), abs=1e-4)


def test_async_matches_sync_with_stops_n_and_logprobs(llm):
    engine = llm.engine
    counter = overlap_counter(engine)
    # A stop token id the greedy continuation really emits (its third new token), found once.
    first = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4),
                         use_tqdm=False)[0].outputs[0].token_ids
    stop_id = next(t for t in first[2:] if t not in first[:2])
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "Write a haiku about the sea.",
               "def fibonacci(n):"]
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
              SamplingParams(temperature=0, max_tokens=16, stop=[" 7"]),
              SamplingParams(temperature=0.9, seed=11, max_tokens=8, n=2, logprobs=2),
              SamplingParams(temperature=0, max_tokens=6),
              SamplingParams(temperature=0, max_tokens=3, repetition_penalty=1.3)]  # synchronous steps while it runs
    runs = {}
    for mode in each_mode(engine):
        counter[0] = 0
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
        if mode:
            assert counter[0] > 0, "asynchronous scheduling never left a step in flight"
    sync, asyn = runs[False], runs[True]
    assert summary(asyn) == summary(sync)
    assert_close_logprobs(asyn, sync)
    # The stops under test did fire (else the comparison proves little).
    assert (sync[0].outputs[0].finish_reason, sync[0].outputs[0].stop_reason) == ("stop", stop_id)
    assert sync[1].outputs[0].finish_reason == "stop" and sync[1].outputs[0].text.endswith(" 6,")
    assert [len(c.token_ids) for c in sync[2].outputs] == [8, 8] and len(sync[3].outputs[0].token_ids) == 6
    assert all(PENDING not in c.token_ids for o in asyn for c in o.outputs)


def drive_with_abort(engine, tag: str, abort_after: int):
    """Stream three requests through engine.step(), abort the second after `abort_after` steps."""
    reqs = {f"{tag}-greedy": SamplingParams(temperature=0, max_tokens=12),
            f"{tag}-aborted": SamplingParams(temperature=0.8, seed=5, max_tokens=12),
            f"{tag}-n2": SamplingParams(temperature=1.0, seed=9, max_tokens=10, n=2)}
    for (rid, p), prompt in zip(reqs.items(), ["Hi", "The weather today is", "My favourite food is"]):
        engine.add_request(rid, prompt, p)
    tokens: dict[tuple[str, int], list[int]] = {}
    finish: dict[tuple[str, int], str] = {}
    steps = 0
    while engine.has_unfinished_requests():
        deltas = engine.step()
        steps += 1
        if steps == abort_after:
            deltas.append(engine.abort_request(f"{tag}-aborted"))
        for d in deltas:
            for s in d.sequences:
                assert finish.get((d.request_id, s.index)) is None, "a delta after the sequence finished"
                tokens.setdefault((d.request_id, s.index), []).extend(s.token_ids)
                if s.finish_reason:
                    finish[(d.request_id, s.index)] = s.finish_reason
    def name(key):  # "<tag>-aborted", 0 -> "aborted/0"
        return key[0][len(tag) + 1:] + f"/{key[1]}"

    return {name(k): v for k, v in tokens.items()}, {name(k): v for k, v in finish.items()}


def test_abort_mid_stream_keeps_the_others_and_frees_every_block(llm):
    engine = llm.engine
    counter = overlap_counter(engine)
    got = {}
    for mode in each_mode(engine):
        got[mode] = drive_with_abort(engine, f"abort-{mode}", abort_after=4)
        engine.blocks.check_invariants()
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "an aborted sequence kept blocks"
    assert counter[0] > 0
    (sync_tok, sync_fin), (async_tok, async_fin) = got[False], got[True]
    assert sync_fin == async_fin and sync_fin["aborted/0"] == "abort"
    aborted_sync, aborted_async = sync_tok.pop("aborted/0"), async_tok.pop("aborted/0")
    # Aborted while a step was in flight: what it emitted is the synchronous run's tokens, cut one
    # step earlier at most (the token in flight is dropped, never emitted).
    assert aborted_async == aborted_sync[:len(aborted_async)] and len(aborted_async) >= len(aborted_sync) - 1
    assert aborted_async and len(aborted_sync) < 12
    assert async_tok == sync_tok and len(sync_tok["greedy/0"]) == 12 and len(sync_tok["n2/1"]) == 10


def test_preemption_gives_the_same_tokens():
    # 8 blocks x 16 tokens for 6 sequences of up to ~40 tokens: they cannot all stay resident.
    small = LLM(dtype="float32", num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=64)
    counter = overlap_counter(small.engine)
    prompts = ["The capital of France is", "Hi", "Write a haiku about the sea.", "1, 2, 3, 4,",
               "List three prime numbers greater than 100 and explain briefly why each one is prime, step by step:",
               "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and its crew were"]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)] * 3
    runs, preempted = {}, {}
    for mode in each_mode(small.engine):
        before = small.engine.scheduler.num_preemptions
        runs[mode] = llm_out = small.generate(prompts, params, use_tqdm=False)
        preempted[mode] = small.engine.scheduler.num_preemptions - before
        assert all(len(o.outputs[0].token_ids) == 12 for o in llm_out)
    assert preempted[False] > 0 and preempted[True] > 0, preempted
    assert counter[0] > 0
    assert summary(runs[True]) == summary(runs[False])
