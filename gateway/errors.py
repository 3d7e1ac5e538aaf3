"""Errors the gateway raises while relaying requests to workers.

Typed moemesh errors become status codes in `moemesh.rpc.ErrorInterceptor`; `WorkerRejectedError`
carries the worker's own status code, which the servicer passes through unchanged.
"""

from __future__ import annotations

import grpc

from moemesh.errors import MoemeshError, UnavailableError


class WorkerRejectedError(MoemeshError):
    """A worker refused a request before generating anything (WorkerEvent.Rejected)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class WorkerLostError(UnavailableError):
    """The Serve stream of the worker running a request broke or ended (UNAVAILABLE)."""


class NoWorkerError(UnavailableError):
    """No worker stream is open, so nothing can run (UNAVAILABLE)."""


def status_code_of(number: int) -> grpc.StatusCode:
    """grpc.StatusCode for a google.rpc.Code number; UNKNOWN for numbers gRPC does not define."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
