"""Typed errors shared by every moemesh process.

Each service's interceptor maps these to gRPC status codes; the CLI prints their message.
Raise them for bad input or bad files; use `assert` only for internal invariants.
"""

from __future__ import annotations

from pathlib import Path


class MoemeshError(Exception):
    """Base class: a clear, user-facing message."""


class ConfigError(MoemeshError):
    """A checkpoint's config.json cannot be served (unknown architecture, bad field)."""


class CheckpointError(MoemeshError):
    """A tensor is missing, mis-shaped or unreadable; the message names tensor and file."""


class InvalidRequestError(MoemeshError):
    """A request is malformed (empty prompt, bad sampling value, too long): INVALID_ARGUMENT."""


class AlreadyExistsError(MoemeshError):
    """Something with this id exists already (a duplicate request id): ALREADY_EXISTS."""


class CapacityError(MoemeshError):
    """No room for more work right now: RESOURCE_EXHAUSTED."""


class RateLimitedError(CapacityError):
    """Over a per-client limit (an API key's requests per minute): RESOURCE_EXHAUSTED, with
    `retry_after_s` (servers send it as the trailing metadata `retry-after`, whole seconds)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnauthenticatedError(MoemeshError):
    """No credential, or one that is not valid (a missing or unknown API key): UNAUTHENTICATED."""


class PermissionDeniedError(MoemeshError):
    """A known caller asked for something its role may not do (a non-admin SetPlacement): PERMISSION_DENIED."""


class UnavailableError(MoemeshError):
    """A peer process is gone or not ready: UNAVAILABLE."""


class CollectiveError(UnavailableError):
    """The data plane of this world generation broke: a collective failed (a peer died or left),
    passed its deadline (a peer is stuck), or was abandoned because a newer world exists. The
    communicator cannot be used again; the rank reports the loss and joins the next generation."""


class NotFoundError(MoemeshError):
    """A named thing (a worker, a request) is not known here: NOT_FOUND."""


def read_text(path: str | Path, what: str, error: type[MoemeshError] = InvalidRequestError) -> str:
    """The text of a file a user named; one it cannot read raises `error` naming what it is and where
    ("cannot read topology t.yaml: No such file or directory")."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
