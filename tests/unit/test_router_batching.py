"""Stream batching in the router (services/router/batching.py): chunks that come while the reader writes
go out as one, a lone chunk goes out at once (before the producer reads on), and nothing is lost,
reordered or held back."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.common.errors import Unavailable
from services.common.outputs import Logprob
from services.common.sampling_params import SamplingParams
from services.router.batching import batched
from services.router.messages import ChoiceDelta, Chunk, GenerateInput, Usage
from tests.unit.router_fakes import FakeEngine, make_router


def chunk(*choices: ChoiceDelta, **kw) -> Chunk:
    return Chunk(request_id="r", model="m", choices=list(choices), **kw)


def test_a_lone_chunk_is_handed_over_without_waiting_for_the_next():
    go_on = asyncio.Event()

    async def source():
        yield chunk(ChoiceDelta(0, "a", [97]))
        await go_on.wait()  # the next chunk comes only once the first was received
        yield chunk(ChoiceDelta(0, "b", [98]), finished=True)

    async def run():
        out = []
        async for c in batched(source()):
            out.append(c)
            go_on.set()
        return out

    out = asyncio.run(asyncio.wait_for(run(), 5))
    assert [(c.choices[0].text, c.finished) for c in out] == [("a", False), ("b", True)]


def test_a_chunk_for_a_waiting_reader_is_handed_over_before_the_producer_reads_on():
    events = []

    async def source():
        yield chunk(ChoiceDelta(0, "a", [97]))
        events.append("read on")
        yield chunk(ChoiceDelta(0, "b", [98]), finished=True)

    async def run():
        async for c in batched(source()):
            events.append("got " + "".join(ch.text for ch in c.choices))

    asyncio.run(asyncio.wait_for(run(), 5))
    assert events == ["got a", "read on", "got b"]


@pytest.mark.parametrize("first_inline", [False, True])
def test_an_inline_first_chunk_reaches_the_reader_before_work_queued_meanwhile(first_inline):
    """first_inline: the first chunk is made in the reader's task, so the reader has it before any callback
    the event loop queued meanwhile (other streams' work); through the producing task it waits behind them."""
    events = []

    async def source():
        await asyncio.sleep(0.01)  # the engine's first message, awaited
        asyncio.get_running_loop().call_soon(events.append, "other work")
        yield chunk(ChoiceDelta(0, "a", [97]))
        yield chunk(ChoiceDelta(0, "b", [98]), finished=True)

    async def run():
        out = []
        async for c in batched(source(), first_inline=first_inline):
            events.append("got " + c.choices[0].text)
            out.append(c)
        return out

    out = asyncio.run(asyncio.wait_for(run(), 5))
    assert [c.choices[0].text for c in out] == ["a", "b"]
    assert events[:2] == (["got a", "other work"] if first_inline else ["other work", "got a"])


@pytest.mark.parametrize("when", ["first", "later"])
def test_leaving_after_an_inline_first_chunk_closes_the_source(when):
    closed = asyncio.Event()

    async def source():
        try:
            for t in range(97, 120):
                yield chunk(ChoiceDelta(0, chr(t), [t]))
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run():
        stream = batched(source(), first_inline=True)
        await anext(stream)
        if when == "later":
            await anext(stream)
        await stream.aclose()
        await asyncio.wait_for(closed.wait(), 1)

    asyncio.run(run())


def test_an_error_before_an_inline_first_chunk_is_raised():
    async def source():
        raise Unavailable("no engine")
        yield  # an async generator

    async def run():
        async for _ in batched(source(), first_inline=True):
            pass

    with pytest.raises(Unavailable, match="no engine"):
        asyncio.run(run())


def test_chunks_that_come_during_a_write_go_out_as_one_in_order():
    lp = [{97 + k: Logprob(-0.1 * k, 1, chr(97 + k))} for k in range(4)]

    async def source():
        yield chunk(engine_id="e1", prompt_token_ids=[1, 2])
        yield chunk(ChoiceDelta(0, "a", [97], [lp[0]]), ChoiceDelta(1, "x", [120], None))
        yield chunk(ChoiceDelta(1, "y", [121], None, "length"))
        yield chunk(ChoiceDelta(0, "bc", [98, 99], lp[1:3]))
        yield chunk(ChoiceDelta(0, "d", [100], lp[3:], "stop", "\n"), finished=True, usage=Usage(2, 6),
                    timing={"total_s": 1.0})

    async def run():
        gen = batched(source())
        first = await anext(gen)  # handed to the waiting reader at once, alone
        await asyncio.sleep(0.05)  # while it is being written, the other four arrive
        return [first] + [c async for c in gen]

    out = asyncio.run(run())
    assert len(out) == 2  # the first alone; the four that came during its write as one
    assert out[0].engine_id == "e1" and not out[0].choices
    merged = out[0]
    for c in out[1:]:
        merged.extend(c)
    a, x = merged.choices
    assert (a.index, a.text, a.token_ids, a.logprobs, a.finish_reason, a.stop_reason) == (
        0, "abcd", [97, 98, 99, 100], lp, "stop", "\n")
    assert (x.index, x.text, x.token_ids, x.logprobs, x.finish_reason) == (1, "xy", [120, 121], None, "length")
    assert merged.finished and merged.usage == Usage(2, 6) and merged.timing == {"total_s": 1.0}
    assert merged.engine_id == "e1" and merged.prompt_token_ids == [1, 2]


def test_every_chunk_field_is_merged():
    """A field added to Chunk or ChoiceDelta must be taught to `extend` (and this list), or batching would drop it."""
    assert {f.name for f in dataclasses.fields(Chunk)} == {
        "request_id", "model", "choices", "finished", "usage", "engine_id", "prompt_token_ids", "prompt_logprobs",
        "timing"}
    assert {f.name for f in dataclasses.fields(ChoiceDelta)} == {
        "index", "text", "token_ids", "logprobs", "finish_reason", "stop_reason"}


def test_an_error_comes_after_the_chunks_before_it():
    async def source():
        yield chunk(ChoiceDelta(0, "a", [97]))
        raise Unavailable("engine gone")

    async def run():
        got = []
        with pytest.raises(Unavailable, match="engine gone"):
            async for c in batched(source()):
                got.append(c.choices[0].text)
        return got

    assert asyncio.run(run()) == ["a"]


def test_a_slow_client_through_the_router_gets_fewer_chunks_and_the_same_text():
    """RouterCore.generate batches: a client reading slowly gets every token once, in fewer writes."""
    r = make_router(a=FakeEngine())
    inp = GenerateInput(params=SamplingParams(temperature=0, max_tokens=40), prompt="abc", request_id="r1")

    async def run():
        out = []
        async for c in r.core.generate(inp):
            out.append(c)
            await asyncio.sleep(0.01)
        return out

    out = asyncio.run(run())
    ids = [t for c in out for ch in c.choices for t in ch.token_ids]
    assert ids == list(range(100, 140)) and "".join(ch.text for c in out for ch in c.choices) == "".join(
        map(chr, range(100, 140)))
    assert len(out) < 20 and out[-1].finished and out[-1].usage.completion_tokens == 40
    assert sum(c.engine_id is not None for c in out) == 1 and out[0].prompt_token_ids == [97, 98, 99]


def test_closing_the_stream_ends_the_producer():
    ended = asyncio.Event()

    async def source():
        try:
            while True:
                yield chunk(ChoiceDelta(0, "a", [97]))
                await asyncio.sleep(0.001)
        finally:
            ended.set()

    async def run():
        stream = batched(source())
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.wait_for(ended.wait(), 1)

    asyncio.run(run())
