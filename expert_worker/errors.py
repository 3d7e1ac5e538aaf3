"""Typed errors of the expert worker (mapped to status codes by moemesh.rpc.ErrorInterceptor)."""

from moemesh.errors import InvalidRequestError, UnavailableError


class NotReadyError(UnavailableError):
    """The worker has not joined its world yet, or is leaving it."""


class DuplicateRequestError(InvalidRequestError):
    """A request id is already running on this worker."""
