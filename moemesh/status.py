"""The one table between typed moemesh errors and gRPC status codes, both directions.

Servers: `moemesh.rpc.ErrorInterceptor` aborts a call with `status_for(exc)`. Clients (moemesh.client,
coordinator.placement_admin, the gateway relaying a worker's rejection) turn a code back into the typed error
with `error_for` / `error_class_for`; every class in the table round-trips (class -> code -> class).
`RelayedStatusError` carries a code that another process chose (the gateway passes a worker's on).
"""

from __future__ import annotations

import grpc

from moemesh.errors import (
    AlreadyExistsError,
    CapacityError,
    InvalidRequestError,
    MoemeshError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)

# Most specific first; each code appears once, so the table reads back unambiguously.
STATUS_OF: tuple[tuple[type[MoemeshError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (MoemeshError, grpc.StatusCode.FAILED_PRECONDITION),
)

# Codes that mean "not yet": the peer is starting, or did not answer before the deadline.
NOT_YET: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RelayedStatusError(MoemeshError):
    """An error whose status code was chosen elsewhere (e.g. a worker's Rejected event); servers
    answer with that code unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(exc: MoemeshError) -> grpc.StatusCode:
    """The status code a server answers `exc` with."""
    if isinstance(exc, RelayedStatusError):
        return exc.code
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    raise AssertionError("unreachable: MoemeshError is in the table")


def error_class_for(code: grpc.StatusCode) -> type[MoemeshError] | None:
    """The typed error a status code stands for; None for codes outside the table."""
    for kind, known in STATUS_OF:
        if known == code:
            return kind
    return None


def error_for(code: grpc.StatusCode, message: str) -> MoemeshError | None:
    """The typed error for `code` with `message` (the server's details); None outside the table."""
    kind = error_class_for(code)
    return None if kind is None else kind(message or code.name)


def status_code_of(number: int) -> grpc.StatusCode:
    """grpc.StatusCode for a google.rpc.Code number; UNKNOWN for numbers gRPC does not define."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def is_not_yet(exc: Exception) -> bool:
    """A retry predicate (moemesh.retry): a gRPC call failed with UNAVAILABLE or DEADLINE_EXCEEDED."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in NOT_YET
