"""OpenAI's error bodies, and the one mapping from exceptions (domain, validation, HTTP) to them."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.common.errors import FolioError
from services.router.openai.protocol import FIELDS

log = logging.getLogger("folio.router.http")

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed", 413: "RequestTooLargeError",
                429: "RateLimitError", 499: "ClientClosedRequest", 500: "InternalServerError",
                503: "ServiceUnavailableError", 504: "TimeoutError"}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, with vLLM's `type` names and the status as `code`."""
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param,
                                   "code": status}}, status_code=status, headers=headers)


def _param_of(message: str) -> str | None:
    """Folio's validation messages start with the field's name ("temperature must be >= 0, ...")."""
    head = message.split(" ", 1)[0].rstrip(":,").split("[", 1)[0]
    if head.split(".", 1)[0] in FIELDS:  # a nested field: response_format.json_schema.schema
        return head
    return head if head in ("prompt_token_ids", "prompt_logprobs") else None


def from_exception(exc: BaseException) -> JSONResponse:
    """The error response for an exception raised while serving a request."""
    if isinstance(exc, FolioError) and exc.http_status != 500:
        status = exc.http_status
        headers = {"Retry-After": "1"} if status == 429 else None
        return error_response(status, str(exc), _param_of(str(exc)) if status in (400, 404) else None, headers)
    if isinstance(exc, ValueError):  # SamplingParams and protobuf range checks: the caller's input
        return error_response(400, str(exc), _param_of(str(exc)))
    if isinstance(exc, FolioError):  # a downstream INTERNAL/UNKNOWN status, after the core's retries
        log.error("request failed: %s", exc)
        return error_response(500, str(exc) or "internal error")
    log.exception("internal error", exc_info=exc)
    return error_response(500, "internal error")


def from_validation_error(exc: RequestValidationError) -> JSONResponse:
    """pydantic's failures as a 400 naming the field (never a 422)."""
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request body")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return error_response(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if not loc:
        return error_response(400, f"request body: {e.get('msg')}")
    # Union members each report their own failure ("prompt.str", "prompt.list[int]"); keep the field path.
    path = ".".join(x for x in loc if not (x.startswith(("list[", "str", "int")) or x in ("function-after",)))
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(400, f"{path}: {e.get('msg')}{extra}", path.split(".", 1)[0] or None)
