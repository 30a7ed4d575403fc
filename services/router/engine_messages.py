"""Engine messages off the wire (an `EngineGenerateResponse`, gRPC's or the fast lane's) as the router's domain
`EngineMessage` (services/router/clients.py): the one conversion both engine transports use."""

from __future__ import annotations

import time

from protos.gen.folio.v1 import engine_pb2
from services.common.convert import FINISH_FROM_PB, position_from_pb
from services.router.clients import EngineMessage, SequenceUpdate


def message_from_pb(msg: engine_pb2.EngineGenerateResponse) -> EngineMessage:
    path = None
    if msg.timing.first_token_path:
        path = [(s.hop, s.monotonic_ns) for s in msg.timing.first_token_path]
        path.append(("router.engine_msg", time.monotonic_ns()))
    return EngineMessage(first_token_path=path,
        sequences=[_sequence_from_pb(d) for d in msg.sequences], finished=msg.finished,
        cached_tokens=msg.usage.cached_tokens,
        queue_s=msg.timing.queue_ns / 1e9 if msg.HasField("timing") else None,
        prompt_logprobs=[position_from_pb(p) for p in msg.prompt_logprobs] if msg.prompt_logprobs else None)


def _sequence_from_pb(d: engine_pb2.SequenceDelta) -> SequenceUpdate:
    stop = d.stop_str or (d.stop_token_id if d.HasField("stop_token_id") else None)
    return SequenceUpdate(index=d.index, token_ids=list(d.token_ids),
                          logprobs=[position_from_pb(p) for p in d.logprobs] if d.logprobs else None,
                          finish_reason=FINISH_FROM_PB[d.finish_reason], stop_reason=stop)
