"""Typed errors of the expert worker (mapped to status codes by moemesh.rpc.ErrorInterceptor)."""

from moemesh.errors import AlreadyExistsError, UnavailableError


class NotReadyError(UnavailableError):
    """The worker has not joined its world yet, or is leaving it."""


class DuplicateRequestError(AlreadyExistsError):
    """A request id is already running on this worker (ALREADY_EXISTS, as worker.proto says)."""
