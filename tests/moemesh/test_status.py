"""moemesh.status: the one table between typed errors and gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from coordinator.errors import UnknownWorkerError, WorldFormedError
from coordinator.placement_admin import rpc_error
from gateway.errors import NoWorkerError, WorkerFailedError
from moemesh.client import typed_error
from moemesh.errors import (
    CapacityError,
    InvalidRequestError,
    MoemeshError,
    NotFoundError,
    UnavailableError,
)
from moemesh.status import (
    STATUS_OF,
    error_class_for,
    error_for,
    status_code_of,
    status_for,
)


@pytest.mark.parametrize("kind, code", STATUS_OF)
def test_every_typed_error_round_trips_through_its_code(kind, code):
    assert status_for(kind("why")) == code
    back = error_for(code, "why")
    assert type(back) is kind and str(back) == "why"


def test_each_code_names_one_class():
    codes = [code for _, code in STATUS_OF]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("exc, code", [
    (UnknownWorkerError("w"), grpc.StatusCode.NOT_FOUND),
    (WorldFormedError("late"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoWorkerError("none"), grpc.StatusCode.UNAVAILABLE),
    (WorkerFailedError(grpc.StatusCode.OUT_OF_RANGE, "worker says no"), grpc.StatusCode.OUT_OF_RANGE),
])
def test_subclasses_take_their_base_code_and_relayed_errors_keep_theirs(exc, code):
    assert status_for(exc) == code


def test_codes_outside_the_table_have_no_typed_error():
    assert error_class_for(grpc.StatusCode.DEADLINE_EXCEEDED) is None
    assert error_for(grpc.StatusCode.INTERNAL, "x") is None


def test_status_code_of_reads_google_rpc_numbers():
    assert status_code_of(5) == grpc.StatusCode.NOT_FOUND
    assert status_code_of(8) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code_of(999) == grpc.StatusCode.UNKNOWN


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="the reason")


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, CapacityError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, UnavailableError),
    (grpc.StatusCode.INTERNAL, MoemeshError),
])
def test_coordinator_tools_read_codes_through_the_table(code, kind):
    err = rpc_error(_rpc_error(code), "127.0.0.1:1", "GetPlacement")
    assert isinstance(err, kind) and code.name in str(err) and "the reason" in str(err)


def test_client_reads_not_found_and_failed_precondition_through_the_table():
    assert type(typed_error(_rpc_error(grpc.StatusCode.NOT_FOUND))) is NotFoundError
    assert type(typed_error(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION))) is MoemeshError
