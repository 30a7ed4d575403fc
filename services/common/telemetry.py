"""OpenTelemetry for every Folio process: one trace per request across router, tokenizer and engine.

Tracing is on only when an OTLP endpoint is given (OTEL_EXPORTER_OTLP_ENDPOINT, read by each
service's main()). Then the gRPC client and server of this process are instrumented, so W3C trace
context rides in gRPC metadata and each hop becomes a child span. Export is batched in a background
thread with a short timeout, and shutdown waits a bounded time: a dead collector never blocks a
request or a shutdown. Without an endpoint nothing is instrumented and `span()` costs a no-op.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from opentelemetry import trace

log = logging.getLogger("folio.telemetry")
_provider = None


def setup(service_name: str, endpoint: str | None, export_timeout_s: float = 2.0) -> bool:
    """Configure tracing for this process; returns whether it is on. Call before creating gRPC servers or channels."""
    global _provider
    if not endpoint or _provider is not None:
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    insecure = not endpoint.startswith("https://")
    target = endpoint.removeprefix("http://").removeprefix("https://")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=target, insecure=insecure, timeout=export_timeout_s)
    provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=int(export_timeout_s * 1000)))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()
    GrpcAioInstrumentorClient().instrument()
    _provider = provider
    log.info("tracing on: %s -> OTLP %s", service_name, endpoint)
    return True


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    return trace.get_tracer("folio")


@contextmanager
def span(name: str, **attributes):
    """A span under the current context (the incoming RPC's span on a server). With tracing off, a
    non-recording span that touches no context (so a stream that moves between tasks can hold it)."""
    if _provider is None:
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(name) as s:
        if attributes and s.is_recording():
            s.set_attributes({k: v for k, v in attributes.items() if v is not None})
        yield s


def shutdown(timeout_s: float = 3.0) -> None:
    """Flush and stop exporting, waiting at most `timeout_s` (a dead collector must not hold us up)."""
    global _provider
    p, _provider = _provider, None
    if p is None:
        return
    t = threading.Thread(target=p.shutdown, name="otel-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("tracing: exporter did not finish within %.1fs; dropping unsent spans", timeout_s)
