"""Services on one host can talk over unix-domain sockets: an engine with --unix-socket is routed to through
it (its registry address is unix:PATH), and a client reaches the router through the router's own socket."""

from __future__ import annotations

from protos.gen.folio.v1 import router_pb2
from tests.integration.helpers import SMALL_ENGINE, generate, params, router_stub, start_stack


def test_engine_and_router_over_unix_sockets(tmp_path_factory):
    d = tmp_path_factory.mktemp("uds")
    stack = start_stack(tmp_path_factory, "uds", engine_args=SMALL_ENGINE + ["--unix-socket", str(d / "e.sock")],
                        router_args=["--unix-socket", str(d / "r.sock")])
    engine_address = f"unix:{d / 'e.sock'}"
    try:
        ch, stub = router_stub(f"unix:{d / 'r.sock'}")
        with ch:
            engines = stub.Stats(router_pb2.RouterStatsRequest(), timeout=30).engines
        assert [e.address for e in engines] == [engine_address]
        over_uds = generate(f"unix:{d / 'r.sock'}", token_ids=router_pb2.TokenIds(ids=[20, 21, 22]),
                            params=params(max_tokens=5, temperature=0, ignore_eos=True))
        over_tcp = generate(stack.router_address, token_ids=router_pb2.TokenIds(ids=[20, 21, 22]),
                            params=params(max_tokens=5, temperature=0, ignore_eos=True))
        assert len(over_uds.token_ids[0]) == 5
        assert over_uds.token_ids == over_tcp.token_ids
        assert over_uds.engine_ids == [engine_address] * len(over_uds.engine_ids)
    finally:
        stack.stop()
