"""Must-show 5: one trace per request across router, tokenizer and engine, exported over OTLP by the real processes."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.integration.helpers import generate, params, start_stack, wait_for

pytestmark = pytest.mark.timeout(300)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC collector that keeps every span it is sent."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {a.key: (a.value.string_value or a.value.int_value or a.value.double_value)
                                 for a in s.attributes}
                        self.spans.append({"service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                                           "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                           "attrs": attrs})
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_trace(self) -> dict[str, list[dict]]:
        with self.lock:
            out: dict[str, list[dict]] = {}
            for s in self.spans:
                out.setdefault(s["trace_id"], []).append(s)
            return out


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    r = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    r.endpoint = f"http://127.0.0.1:{port}"
    r.server = server
    yield r
    server.stop(0)


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory, receiver):
    """One stack exporting to the receiver, for both tests in file order (the second stops the receiver, and
    then the stack)."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    s = start_stack(tmp_path_factory, "tracing", engines=1, env=env)
    yield s
    s.stop()


def test_one_trace_spans_router_tokenizer_and_engine(traced_stack, receiver):
    stack = traced_stack
    res = generate(stack.router_address, text="The capital of France is", params=params(temperature=0, max_tokens=5),
                   request_id="traced-1")
    assert res.usage.completion_tokens == 5

    def complete_trace():
        for tid, spans in receiver.by_trace().items():
            if any(s["attrs"].get("folio.request_id") == "traced-1" and s["service"] == "folio-router"
                   for s in spans) and {"folio-router", "folio-tokenizer", "folio-engine"} <= {s["service"] for s in spans}:
                return tid, spans
        return None

    tid, spans = wait_for(complete_trace, timeout=10, interval=0.1, what="spans from all three services")
    names = {(s["service"], s["name"]) for s in spans}
    assert ("folio-router", "/folio.v1.Router/Generate") in names
    assert ("folio-tokenizer", "/folio.v1.Tokenizer/Encode") in names
    # The router detokenizes in its own process over the tokenizer's files (docs/router.md).
    assert ("folio-tokenizer", "/folio.v1.Tokenizer/Detokenize") not in names
    assert ("folio-engine", "/folio.v1.Engine/Generate") in names
    router = next(s for s in spans if s["name"] == "folio.router.generate")
    assert router["attrs"]["folio.model"] == "SmolLM2-135M-Instruct"
    assert router["attrs"]["folio.prompt_tokens"] == 5 and router["attrs"]["folio.output_tokens"] == 5
    assert router["attrs"]["folio.time_to_first_token_ms"] > 0
    engine = next(s for s in spans if s["name"] == "folio.engine.generate")
    assert engine["attrs"]["folio.request_id"] == "traced-1"
    assert engine["attrs"]["folio.output_tokens"] == 5 and "folio.queue_time_ms" in engine["attrs"]
    # The engine's span hangs under the router's call, across the process boundary.
    ids = {s["span_id"]: s for s in spans}
    parent = ids[engine["parent"]]
    assert parent["service"] == "folio-engine" and parent["name"] == "/folio.v1.Engine/Generate"
    # ...whose parent is the router's client call (exported when that call's span ends).
    caller = wait_for(lambda: next((s for s in receiver.by_trace()[tid] if s["span_id"] == parent["parent"]), None),
                      timeout=10, interval=0.1, what=f"the router client span {parent['parent']} in {[(s['service'], s['name'], s['span_id'], s['parent']) for s in receiver.by_trace()[tid]]}")
    assert caller["service"] == "folio-router"


def test_a_dead_collector_blocks_neither_requests_nor_shutdown(traced_stack, receiver):
    """The collector goes away (nothing listens on its port any more): requests are served at once and the
    stack still stops quickly (each service's exporter gives up instead of waiting for it)."""
    stack = traced_stack
    receiver.server.stop(0).wait()
    try:
        t0 = time.monotonic()
        res = generate(stack.router_address, text="Hello", params=params(temperature=0, max_tokens=4))
        assert res.usage.completion_tokens == 4
        assert time.monotonic() - t0 < 10
    finally:
        t0 = time.monotonic()
        stack.stop(timeout_s=30)
        stopped_in = time.monotonic() - t0
    assert stopped_in < 8, f"shutdown took {stopped_in:.1f}s with a dead collector"
