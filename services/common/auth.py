"""API-key authentication for a gRPC server: `authorization: Bearer <key>` metadata on Folio's RPCs.

Health checking and reflection stay open (probes and tooling carry no key). The HTTP API checks the
same key in its own middleware (services/router); both compare in constant time.
"""

from __future__ import annotations

import hmac

import grpc


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates a client (empty when no key is set)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("api_key: must be non-empty")
        self._expected = f"Bearer {api_key}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        if not details.method.startswith("/folio.") or self._authorized(details):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authorization: send metadata 'authorization: Bearer <api key>'")

        async def refuse_stream(request, context):
            await refuse(request, context)
            yield  # pragma: no cover - unreachable; makes this an async generator for streaming RPCs

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                     handler.response_serializer)
