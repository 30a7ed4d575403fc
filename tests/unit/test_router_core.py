"""RouterCore and RequestStream over fake engine/tokenizer/registry clients (tests/unit/router_fakes.py):
retry before the first token, resume elsewhere mid-stream, give-up, cancellation and stop strings, on CPU."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.common.sampling_params import SamplingParams
from services.router.messages import GenerateInput
from tests.unit.router_fakes import EOS_ID, FakeEngine, make_router

PROMPT = "abc"  # token ids 97 98 99; the fake engines continue 100 ("d"), 101 ("e"), ...


def _run(router, inp: GenerateInput):
    async def go():
        return [c async for c in router.core.generate(inp)]
    return asyncio.run(go())


def _inp(**params) -> GenerateInput:
    return GenerateInput(params=SamplingParams(temperature=0, **params), prompt=PROMPT, request_id="r1")


def _joined(chunks, index=0):
    text = "".join(c.text for ch in chunks for c in ch.choices if c.index == index)
    ids = [t for ch in chunks for c in ch.choices if c.index == index for t in c.token_ids]
    return text, ids


def _expected(n_tokens: int, step: int = 1):
    ids = [99 + step * (k + 1) for k in range(n_tokens)]
    return "".join(map(chr, ids)), ids


def test_healthy_engine_streams_every_token_once():
    r = make_router(a=FakeEngine())
    chunks = _run(r, _inp(max_tokens=6))
    assert _joined(chunks) == _expected(6)
    assert chunks[0].engine_id == "a" and chunks[0].prompt_token_ids == [97, 98, 99]
    last = chunks[-1]
    assert last.finished and last.usage.prompt_tokens == 3 and last.usage.completion_tokens == 6
    assert last.choices[-1].finish_reason == "length"
    assert r.tokenizer.detokenizers[0].opened_early and r.tokenizer.detokenizers[0].finished
    assert r.core.stats()["in_flight"] == 0 and r.core.stats()["requests_total"] == 1


def test_engine_failing_before_first_token_is_retried_elsewhere():
    r = make_router(a=FakeEngine(fail_after=0), b=FakeEngine())
    chunks = _run(r, _inp(max_tokens=5))
    assert _joined(chunks) == _expected(5)
    assert [c.engine_id for c in chunks if c.engine_id] == ["b"]
    assert r.registry.released == [("a", "r1")] and r.registry.suspects == ["a"]
    assert r.engines["b"].calls[0].request.prompt_token_ids == [97, 98, 99]
    assert r.core.stats()["retries"] == 1 and r.core.stats()["failovers"] == 0


def test_engine_failing_mid_stream_resumes_elsewhere_without_lost_or_repeated_tokens():
    r = make_router(a=FakeEngine(fail_after=3), b=FakeEngine())
    chunks = _run(r, _inp(max_tokens=8))
    assert _joined(chunks) == _expected(8)
    resumed = r.engines["b"].calls[0].request
    assert resumed.prompt_token_ids == [97, 98, 99, 100, 101, 102]  # the prompt plus the 3 tokens streamed
    assert resumed.params.max_tokens == 5
    assert [c.engine_id for c in chunks if c.engine_id] == ["a", "b"]
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == 3
    assert r.core.stats()["failovers"] == 1 and r.registry.released == []


def test_stop_string_across_the_failover_boundary_is_found():
    r = make_router(a=FakeEngine(fail_after=3), b=FakeEngine())  # a streams "def", b continues "ghi..."
    chunks = _run(r, _inp(max_tokens=10, stop=["fg"]))
    text, ids = _joined(chunks)
    assert text == "de"
    assert ids == [100, 101, 102, 103]  # tokens up to the one completing the stop string
    assert (chunks[-1].choices[-1].finish_reason, chunks[-1].choices[-1].stop_reason) == ("stop", "fg")


def test_stop_string_hit_aborts_the_engine_request():
    r = make_router(a=FakeEngine())
    chunks = _run(r, _inp(max_tokens=50, stop=["gh", "xyz"]))
    text, ids = _joined(chunks)
    assert text == "def" and ids == [100, 101, 102, 103, 104]
    assert chunks[-1].finished and chunks[-1].choices[-1].finish_reason == "stop"
    assert chunks[-1].choices[-1].stop_reason == "gh" and chunks[-1].usage.completion_tokens == 5
    call = r.engines["a"].calls[0]
    assert call.cancelled and call.tokens_sent == 5  # the router did not wait for the engine's max_tokens


def test_include_stop_str_in_output_keeps_the_stop_string():
    r = make_router(a=FakeEngine())
    text, _ = _joined(_run(r, _inp(max_tokens=50, stop=["gh"], include_stop_str_in_output=True)))
    assert text == "defgh"


def test_stop_strings_wait_for_min_tokens():
    r = make_router(a=FakeEngine())
    chunks = _run(r, _inp(max_tokens=5, stop=["de"], min_tokens=3))
    assert _joined(chunks) == _expected(5)
    assert chunks[-1].choices[-1].finish_reason == "length" and not r.engines["a"].calls[0].cancelled


def test_the_eos_token_that_ended_a_sequence_is_not_searched_for_stop_strings():
    r = make_router(a=FakeEngine(eos_at=2))  # "de" then EOS ("|")
    chunks = _run(r, _inp(max_tokens=10, stop=["e|"]))
    assert _joined(chunks) == ("de|", [100, 101, EOS_ID])
    assert (chunks[-1].choices[-1].finish_reason, chunks[-1].choices[-1].stop_reason) == ("stop", EOS_ID)


def test_every_engine_failing_gives_up_with_a_clear_error():
    r = make_router(a=FakeEngine(fail_after=0), b=FakeEngine(fail_after=0))
    with pytest.raises(Unavailable, match="no other live engine serves 'fake-model' \\(tried 2\\)"):
        _run(r, _inp(max_tokens=4))
    assert r.core.stats()["in_flight"] == 0


def test_attempts_run_out():
    r = make_router(max_attempts=2, a=FakeEngine(fail_after=0), b=FakeEngine(fail_after=0), c=FakeEngine())
    with pytest.raises(Unavailable, match="fake engine failure"):
        _run(r, _inp(max_tokens=4))
    assert r.engines["c"].calls == []


def test_every_queue_full_is_resource_exhausted_and_engines_are_not_suspected():
    r = make_router(a=FakeEngine(fail_after=0, error=ResourceExhausted),
                    b=FakeEngine(fail_after=0, error=ResourceExhausted))
    with pytest.raises(ResourceExhausted, match="waiting queue of every engine"):
        _run(r, _inp(max_tokens=4))
    assert r.registry.suspects == []


def test_non_retryable_engine_error_is_raised_at_once():
    r = make_router(a=FakeEngine(fail_after=0, error=InvalidArgument), b=FakeEngine())
    with pytest.raises(InvalidArgument):
        _run(r, _inp(max_tokens=4))
    assert r.engines["b"].calls == []


def test_deadline_from_the_engine_is_deadline_exceeded():
    r = make_router(a=FakeEngine(fail_after=1, error=DeadlineExceeded), b=FakeEngine())
    with pytest.raises(DeadlineExceeded):
        _run(r, _inp(max_tokens=4))
    assert r.engines["b"].calls == []


def test_n_greater_than_one_resumes_each_unfinished_sequence_apart():
    """n = 3, the engine fails after 2 tokens: each sequence continues as an n = 1 request from the prompt plus
    its own tokens, and every sequence's text comes out whole, each token once."""
    r = make_router(a=FakeEngine(fail_after=2), b=FakeEngine())
    chunks = _run(r, _inp(max_tokens=6, n=3))
    for i in range(3):
        assert _joined(chunks, i) == _expected(6, step=i + 1)
    calls = r.engines["b"].calls
    assert sorted(c.request.prompt_token_ids for c in calls) == sorted(
        [97, 98, 99] + _expected(2, step=i + 1)[1] for i in range(3))
    assert all(c.request.params.n == 1 and c.request.params.max_tokens == 4 for c in calls)
    assert sorted(c.request.request_id for c in calls) == ["r1-0", "r1-1", "r1-2"]
    assert [c.finished for c in chunks].count(True) == 1 and chunks[-1].finished
    assert chunks[-1].usage.completion_tokens == 18
    assert sorted(c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason) == ["length"] * 3


def test_n_greater_than_one_sequence_failing_again_moves_again():
    r = make_router(a=FakeEngine(fail_after=2), b=FakeEngine(fail_after=1), c=FakeEngine())
    chunks = _run(r, _inp(max_tokens=6, n=2))
    for i in range(2):
        assert _joined(chunks, i) == _expected(6, step=i + 1)
    assert len(r.engines["c"].calls) == 2
    assert sorted(len(c.request.prompt_token_ids) for c in r.engines["c"].calls) == [6, 6]  # 3 + 2 on a + 1 on b


def test_n_greater_than_one_finished_sequences_are_not_continued():
    """A stop string ends sequence 0 (step 1: "de" then "f") before the failure; only sequence 1 moves."""
    r = make_router(a=FakeEngine(fail_after=3), b=FakeEngine())
    chunks = _run(r, _inp(max_tokens=6, n=2, stop=["ef"]))
    assert _joined(chunks, 0)[0] == "d"
    assert _joined(chunks, 1) == _expected(6, step=2)
    assert [c.request.request_id for c in r.engines["b"].calls] == ["r1-1"]


def test_seeded_n_greater_than_one_continuations_get_their_own_seeds():
    r = make_router(a=FakeEngine(fail_after=1), b=FakeEngine())
    _run(r, _inp(max_tokens=3, n=2, seed=7))
    seeds = sorted(c.request.params.seed for c in r.engines["b"].calls)
    assert seeds == [7 * 1_000_003 + 1, 7 * 1_000_003 + 2]
    r = make_router(a=FakeEngine(fail_after=1), b=FakeEngine())
    _run(r, _inp(max_tokens=3, seed=7))  # n == 1 continues with the request's own seed, as before
    assert r.engines["b"].calls[0].request.params.seed == 7


def test_n_sequences_each_stream_their_own_tokens():
    r = make_router(a=FakeEngine())
    chunks = _run(r, _inp(max_tokens=4, n=2))
    assert _joined(chunks, 0) == _expected(4, step=1)
    assert _joined(chunks, 1) == _expected(4, step=2)
    assert chunks[-1].usage.completion_tokens == 8


def test_cancelling_the_consumer_cancels_the_engine_call():
    r = make_router(a=FakeEngine(delay_s=0.01))

    async def go():
        task = asyncio.ensure_future(_consume_forever(r))
        while not r.engines["a"].calls or r.engines["a"].calls[0].tokens_sent < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    call = r.engines["a"].calls[0]
    assert call.cancelled and 3 <= call.tokens_sent < 1000
    assert r.tokenizer.detokenizers[0].closed and not r.tokenizer.detokenizers[0].finished
    assert r.core.stats()["in_flight"] == 0


def test_a_consumer_that_stops_reading_cancels_the_engine_call():
    r = make_router(a=FakeEngine())

    async def go():
        async with aclosing(r.core.generate(_inp(max_tokens=100))) as chunks:
            async for c in chunks:
                if any(ch.token_ids for ch in c.choices):
                    break

    asyncio.run(go())
    assert r.engines["a"].calls[0].cancelled and r.engines["a"].calls[0].tokens_sent == 1


async def _consume_forever(r):
    async for _ in r.core.generate(_inp(max_tokens=1000)):
        pass


def test_the_call_started_on_the_predicted_engine_is_the_one_used():
    r = make_router(a=FakeEngine(), b=FakeEngine())
    chunks = _run(r, _inp(max_tokens=4))
    assert _joined(chunks) == _expected(4)
    assert len(r.engines["a"].calls) == 1 and not r.engines["b"].calls  # one call, started before the choice
    assert r.core.stats()["calls_ahead"] == 1 and r.core.stats()["calls_moved"] == 0


def test_a_wrong_prediction_is_cancelled_and_the_chosen_engine_called():
    r = make_router(a=FakeEngine(), b=FakeEngine())
    r.registry.wrong_guess = "b"  # the cached view says b; Redis chooses a
    chunks = _run(r, _inp(max_tokens=4))
    assert _joined(chunks) == _expected(4)
    assert [c.engine_id for c in chunks if c.engine_id] == ["a"]
    early = r.engines["b"].calls
    assert len(early) == 1 and early[0].cancelled and early[0].tokens_sent == 0  # aborted on b, nothing read
    assert r.registry.released == [] and r.core.stats()["retries"] == 0
    assert r.core.stats()["calls_moved"] == 1 and r.core.stats()["calls_ahead"] == 0


def test_no_engine_chosen_cancels_the_predicted_call():
    r = make_router(a=FakeEngine())
    r.registry.wrong_guess, r.registry.engine_ids = "a", []  # the view still shows a; Redis has no engine
    with pytest.raises(Unavailable):
        _run(r, _inp(max_tokens=4))
    assert len(r.engines["a"].calls) == 1 and r.engines["a"].calls[0].cancelled
