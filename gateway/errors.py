"""Errors the gateway raises while relaying requests to workers.

Typed moemesh errors become status codes in `moemesh.rpc.ErrorInterceptor` (the one table in
moemesh.status). `WorkerFailedError` carries the status code of a failure that reached a request
before its first token (the worker's own code for a rejection, UNAVAILABLE for a lost stream): the
interceptor answers with that code unchanged.
"""

from __future__ import annotations

from moemesh.errors import UnavailableError
from moemesh.status import RelayedStatusError


class WorkerFailedError(RelayedStatusError):
    """A request failed before its first token (rejected by its worker, or its worker's stream
    broke); the gateway answers with the failure's own status code."""


class NoWorkerError(UnavailableError):
    """No worker stream is open, so nothing can run (UNAVAILABLE)."""
