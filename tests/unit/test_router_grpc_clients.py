"""The gRPC engine client's edge: an engine's protobuf message becomes the domain `EngineMessage`
the router's core reads (finish reasons, stop string vs stop token, timing, logprobs)."""

from __future__ import annotations

import pytest

from protos.gen.folio.v1 import common_pb2, engine_pb2
from services.common.convert import position_to_pb
from services.common.outputs import Logprob
from services.router.grpc_clients import message_from_pb


def test_a_middle_message_has_tokens_and_nothing_else():
    msg = engine_pb2.EngineGenerateResponse(sequences=[engine_pb2.SequenceDelta(index=1, token_ids=[5, 6])])
    m = message_from_pb(msg)
    assert not m.finished and m.queue_s is None and m.prompt_logprobs is None and m.cached_tokens == 0
    (s,) = m.sequences
    assert (s.index, s.token_ids, s.logprobs, s.finish_reason, s.stop_reason) == (1, [5, 6], None, None, None)


def test_last_message_carries_finish_reason_stop_token_usage_and_timing():
    msg = engine_pb2.EngineGenerateResponse(
        sequences=[engine_pb2.SequenceDelta(index=0, token_ids=[2], finish_reason=common_pb2.FINISH_REASON_STOP,
                                            stop_token_id=2)],
        finished=True, usage=common_pb2.Usage(cached_tokens=16), timing=common_pb2.Timing(queue_ns=2_500_000))
    m = message_from_pb(msg)
    assert m.finished and m.cached_tokens == 16 and m.queue_s == pytest.approx(0.0025)
    assert (m.sequences[0].finish_reason, m.sequences[0].stop_reason) == ("stop", 2)


def test_stop_string_and_logprobs_convert():
    entry = {7: Logprob(-0.5, 1, "x"), 9: Logprob(-1.5, 2, "y")}
    msg = engine_pb2.EngineGenerateResponse(
        sequences=[engine_pb2.SequenceDelta(index=0, token_ids=[7], finish_reason=common_pb2.FINISH_REASON_STOP,
                                            stop_str="\n\n", logprobs=[position_to_pb(entry)])],
        prompt_logprobs=[position_to_pb(None), position_to_pb(entry)])
    m = message_from_pb(msg)
    s = m.sequences[0]
    assert s.stop_reason == "\n\n" and s.finish_reason == "stop"
    assert s.logprobs[0][7].logprob == -0.5 and s.logprobs[0][9].decoded_token == "y"
    assert m.prompt_logprobs[0] is None and m.prompt_logprobs[1][9].rank == 2
