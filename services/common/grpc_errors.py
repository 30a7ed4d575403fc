"""The one place where domain errors (services/common/errors.py) and gRPC status codes meet.

Servicers never pick status codes themselves: `ErrorInterceptor` maps whatever escapes a handler,
and `from_rpc_error` turns a downstream service's status back into a domain error.
"""

from __future__ import annotations

import logging

import grpc

from services.common.errors import FolioError, InvalidArgument, clip_message, from_status

log = logging.getLogger("folio.errors")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised by domain code."""
    if isinstance(exc, FolioError):
        return getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL), clip_message(str(exc))
    if isinstance(exc, grpc.aio.AioRpcError):  # a downstream service's status passes through
        return exc.code(), clip_message(exc.details() or exc.code().name)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, clip_message(str(exc))
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def from_rpc_error(err: grpc.aio.AioRpcError) -> FolioError:
    """A downstream RPC failure as a domain error (keeps the code and message)."""
    return from_status(err.code().name, err.details())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into status codes (see `status_of`), for every RPC shape."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        # Only Folio's own services: health and reflection handlers follow their own conventions.
        if handler is None or not details.method.startswith("/folio."):
            return handler
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(_decoded(request), context)
                except Exception as e:  # noqa: BLE001 - this is the mapping point
                    status = _status_or_reraise(e)
                # gRPC keeps the AbortError that context.abort raises in a reference cycle with this
                # frame until a full garbage collection: drop the request first (a 10 MB prompt
                # would otherwise stay resident), and abort outside the except block so the domain
                # error's traceback (the handler's frames and their locals) is not chained to it.
                del request
                await context.abort(*status)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)

        def wrap_stream(inner, client_streams: bool):
            async def gen(request, context):
                try:
                    request = _decoded_stream(request) if client_streams else _decoded(request)
                    async for item in inner(request, context):
                        yield item
                    return
                except Exception as e:  # noqa: BLE001
                    status = _status_or_reraise(e)
                del request  # as in unary_unary above
                await context.abort(*status)
            return gen

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream, False), deserialize,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream, True), deserialize,
                                                         handler.response_serializer)
        return handler


class _Undecodable:
    """Stands in for a request message whose bytes did not parse (see `_tolerant`)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserialize):
    """A request deserializer that hands undecodable bytes to the handler wrapper as `_Undecodable`
    instead of failing inside gRPC (which answers UNKNOWN/INTERNAL): the wrapper turns it into
    INVALID_ARGUMENT, as any other bad input."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and anything else a parser raises
            return _Undecodable(e)
    return parse


def _decoded(request):
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"request: the message's bytes are not a valid protobuf message of this RPC's "
                              f"request type ({type(request.error).__name__})")
    return request


async def _decoded_stream(requests):
    async for request in requests:
        yield _decoded(request)


def _status_or_reraise(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
        raise exc  # the handler aborted with its own status
    return status_of(exc)
