"""Typed coordinator errors. Each subclasses a moemesh.errors class, so the shared
ErrorInterceptor (moemesh.rpc, table in moemesh.status) maps it to the status code the contract names:

- NotFoundError       -> NOT_FOUND
- CapacityError       -> RESOURCE_EXHAUSTED
- UnavailableError    -> UNAVAILABLE
- MoemeshError        -> FAILED_PRECONDITION (the table's fallback)
"""

from __future__ import annotations

from moemesh.errors import CapacityError, MoemeshError, NotFoundError, UnavailableError


class WorldFormedError(CapacityError):
    """No longer raised: a worker registering after the first world joins the next generation.
    Kept so that moemesh.v1 clients and tests/moemesh/test_status.py still name it."""


class StaleIncarnationError(MoemeshError):
    """A registration carries an older incarnation than the one on record: FAILED_PRECONDITION."""


class UnknownWorkerError(NotFoundError):
    """(worker_id, incarnation) is not registered (never, removed, or superseded): NOT_FOUND."""


class WorldNotFormedError(MoemeshError):
    """An operation needs a formed world and none exists yet: FAILED_PRECONDITION."""


class NoPlacementError(UnavailableError):
    """No placement has been published yet (GetPlacement before the first world): UNAVAILABLE."""


class GenerationMismatchError(MoemeshError):
    """A request names a world generation that is not the current one: FAILED_PRECONDITION."""


class EpochMismatchError(MoemeshError):
    """SetPlacement's expected_epoch is not the current epoch (optimistic concurrency lost)."""


class ShuttingDownError(UnavailableError):
    """The coordinator is stopping; the caller should retry against its replacement."""
