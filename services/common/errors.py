"""Folio's domain errors: what a caller can act on, with no transport attached.

Domain code raises these (or ValueError for bad input, which always names the offending field).
Each class names its status (`status`, a gRPC status code name) and its HTTP status; the one table
that turns them into gRPC status codes is services/common/grpc_errors.py, and the HTTP layer reads
`http_status`.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1024
"""Longest error message sent to a client (gRPC details travel in trailers, capped at a few KB)."""


def quote(value, limit: int = 80) -> str:
    """repr() of a client-supplied value for an error message, cut to `limit` characters: a message must
    not grow with the input it refuses (a 20 KB model name must not turn NOT_FOUND into a trailer
    overflow)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r) - limit} more characters)"


def clip_message(message: str) -> str:
    """An error message cut to MAX_MESSAGE_CHARS (the last line of defence; quote() at the source)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"


class FolioError(Exception):
    """Base of the errors a caller can act on; `status` names the gRPC status code it maps to."""

    status = "INTERNAL"
    http_status = 500


class InvalidArgument(FolioError, ValueError):
    status = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(FolioError):
    status = "NOT_FOUND"
    http_status = 404


class ResourceExhausted(FolioError):
    status = "RESOURCE_EXHAUSTED"
    http_status = 429


class QueueFullError(ResourceExhausted):
    """An engine's waiting queue is at its bound (EngineConfig.max_waiting_requests)."""


class Unavailable(FolioError):
    status = "UNAVAILABLE"
    http_status = 503


class DeadlineExceeded(FolioError):
    status = "DEADLINE_EXCEEDED"
    http_status = 504


class Cancelled(FolioError):
    status = "CANCELLED"
    http_status = 499


ERRORS_BY_STATUS: dict[str, type[FolioError]] = {
    c.status: c for c in (InvalidArgument, NotFound, ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled)
}


def from_status(status: str, message: str) -> FolioError:
    """A downstream service's failure, named by its gRPC status code name, as a domain error (keeps both)."""
    cls = ERRORS_BY_STATUS.get(status, FolioError)
    e = cls(message or status)
    if cls is FolioError:
        e.status = status
    return e
