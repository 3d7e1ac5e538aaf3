"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with HTTP statuses.

One rule: an exception becomes a gRPC status code through the one table in moemesh.status
(`status_for`: a typed error's class, or the code a worker chose for a relayed one), and that code
becomes an HTTP status through `HTTP_OF` below (the canonical gRPC -> HTTP mapping of
google.rpc.Code). So INVALID_ARGUMENT is 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429 and
UNAVAILABLE 503 on the HTTP API exactly when the gRPC API answers those codes. Anything that is not
a MoemeshError is a bug: it is logged with its traceback and answered 500 with a plain message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import grpc

from moemesh.errors import InvalidRequestError, MoemeshError, NotFoundError, RateLimitedError
from moemesh.status import RelayedStatusError, status_for

log = logging.getLogger(__name__)

_S = grpc.StatusCode
# gRPC status code -> (HTTP status, OpenAI error type). google.rpc.Code's documented HTTP mapping.
HTTP_OF: dict[grpc.StatusCode, tuple[int, str]] = {
    _S.INVALID_ARGUMENT: (400, "invalid_request_error"),
    _S.FAILED_PRECONDITION: (400, "invalid_request_error"),
    _S.OUT_OF_RANGE: (400, "invalid_request_error"),
    _S.UNAUTHENTICATED: (401, "authentication_error"),
    _S.PERMISSION_DENIED: (403, "permission_error"),
    _S.NOT_FOUND: (404, "not_found_error"),
    _S.ALREADY_EXISTS: (409, "conflict_error"),
    _S.ABORTED: (409, "conflict_error"),
    _S.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    _S.CANCELLED: (499, "cancelled"),
    _S.UNIMPLEMENTED: (501, "not_implemented_error"),
    _S.UNAVAILABLE: (503, "service_unavailable_error"),
    _S.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
INTERNAL = (500, "server_error")  # UNKNOWN, INTERNAL, DATA_LOSS, and every bug


class BadParamError(InvalidRequestError):
    """A request field is missing, of the wrong type, or asks for something not served (400);
    `param` names the field in OpenAI's terms."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class UnknownModelError(NotFoundError):
    """The request names a model this gateway does not serve (404, code model_not_found)."""

    param = "model"
    openai_code = "model_not_found"


class GenerationFailedError(RelayedStatusError):
    """A generation ended with an error after it had started (Finished{ERROR}): INTERNAL, 500."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.INTERNAL, message)


@dataclass(frozen=True)
class HttpError:
    """What the client receives: the status, the OpenAI-shaped body, and headers (Retry-After when
    an API key is over its rate, in whole seconds, as gRPC's trailing `retry-after`)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(exc: BaseException) -> HttpError:
    """The answer to `exc` (see the module docstring)."""
    if not isinstance(exc, MoemeshError):
        log.error("unexpected error in an HTTP handler", exc_info=exc)
        status, kind = INTERNAL
        return HttpError(status, error_body(f"internal error ({type(exc).__name__}); see the gateway's log", kind))
    grpc_code = status_for(exc)
    status, kind = HTTP_OF.get(grpc_code, INTERNAL)
    headers = {"Retry-After": str(math.ceil(exc.retry_after_s))} if isinstance(exc, RateLimitedError) else {}
    return HttpError(status, error_body(str(exc), kind, getattr(exc, "param", None),
                                        getattr(exc, "openai_code", None)), headers)
