"""The router sends its requests over the engine's fast lane (services/common/fast_lane.py, the default) once an
opened call has named it, the real engine's thread writing each first message: the same tokens as the first
request's, which rides gRPC, and the engine names its lane in the opening's metadata (the real engine process's
`serve` wiring)."""

from __future__ import annotations

import time


from protos.gen.folio.v1 import router_pb2
from services.common.fast_lane import METADATA_KEY
from tests.integration.helpers import engine_stub, generate, params, router_stub, start_stack


def test_requests_over_the_fast_lane_match_grpc(tmp_path_factory):
    stack = start_stack(tmp_path_factory, "lane")
    try:
        ch, stub = router_stub(stack.router_address)
        with ch:
            engine_address = stub.Stats(router_pb2.RouterStatsRequest(), timeout=30).engines[0].address
        ech, estub = engine_stub(engine_address)
        with ech:
            call = estub.GenerateStream(iter(()))
            lane = dict(call.initial_metadata()).get(METADATA_KEY)
            call.cancel()
        assert lane and lane.rsplit(":", 1)[1].isdigit()
        outs = []
        for _ in range(4):  # the first rides gRPC (and opens calls ahead, which name the lane), later ones the lane
            outs.append(generate(stack.router_address, token_ids=router_pb2.TokenIds(ids=[20, 21, 22]),
                                 params=params(max_tokens=6, temperature=0, ignore_eos=True)).token_ids)
            time.sleep(0.2)
        assert len(outs[0][0]) == 6
        assert all(o == outs[0] for o in outs)
    finally:
        stack.stop()
