"""Errors the gateway raises while relaying requests to workers.

Typed moemesh errors become status codes in `moemesh.rpc.ErrorInterceptor` (the table in
moemesh.status); `WorkerRejectedError` carries the worker's own status code, which the interceptor
passes through unchanged. `status_code_of` (google.rpc.Code number -> grpc.StatusCode) is
re-exported from moemesh.status.
"""

from __future__ import annotations

from moemesh.errors import UnavailableError
from moemesh.status import RelayedStatusError, status_code_of

__all__ = ["NoWorkerError", "WorkerLostError", "WorkerRejectedError", "status_code_of"]


class WorkerRejectedError(RelayedStatusError):
    """A worker refused a request before generating anything (WorkerEvent.Rejected); the gateway
    answers with the worker's own status code."""


class WorkerLostError(UnavailableError):
    """The Serve stream of the worker running a request broke or ended (UNAVAILABLE)."""


class NoWorkerError(UnavailableError):
    """No worker stream is open, so nothing can run (UNAVAILABLE)."""
