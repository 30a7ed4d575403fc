"""Folio's domain errors and the one place where they become gRPC status codes.

Domain code raises these (or ValueError for bad input, which always names the offending field);
servicers never pick status codes themselves. The HTTP layer maps the same classes to OpenAI-style
error bodies through `http_status`.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger("folio.errors")


class FolioError(Exception):
    """Base of the errors a caller can act on; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL
    http_status = 500


class InvalidArgument(FolioError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(FolioError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class ResourceExhausted(FolioError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(FolioError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(FolioError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(FolioError):
    code = grpc.StatusCode.CANCELLED
    http_status = 499


_BY_CODE = {c.code: c for c in (InvalidArgument, NotFound, ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled)}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised by domain code."""
    if isinstance(exc, FolioError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):  # a downstream service's status passes through
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    name = type(exc).__name__
    if name == "QueueFullError":  # services.engine.scheduler, not imported here (it pulls no torch, but keep common light)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "the engine's waiting queue is full"
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def from_rpc_error(err: grpc.aio.AioRpcError) -> FolioError:
    """A downstream RPC failure as a domain error (keeps the code and message)."""
    cls = _BY_CODE.get(err.code(), FolioError)
    e = cls(err.details() or err.code().name)
    if cls is FolioError:
        e.code = err.code()
    return e


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into status codes (see `status_of`), for every RPC shape."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        # Only Folio's own services: health and reflection handlers follow their own conventions.
        if handler is None or not details.method.startswith("/folio."):
            return handler
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(request, context)
                except Exception as e:  # noqa: BLE001 - this is the mapping point
                    await _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)

        def wrap_stream(inner):
            async def gen(request, context):
                try:
                    async for item in inner(request, context):
                        yield item
                except Exception as e:  # noqa: BLE001
                    await _abort(context, e)
            return gen

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
        raise exc
    code, msg = status_of(exc)
    await context.abort(code, msg)
