"""The HTTP status of every error comes from its gRPC code (moemesh.status), in OpenAI's shape."""

from __future__ import annotations

import grpc

from gateway.errors import NoWorkerError, WorkerFailedError
from gateway.http.errors import HTTP_OF, BadParamError, GenerationFailedError, UnknownModelError, http_error
from moemesh.errors import CapacityError, InvalidRequestError, MoemeshError
from moemesh.status import STATUS_OF


def test_every_typed_error_has_the_status_of_its_grpc_code():
    expected = {InvalidRequestError: 400, CapacityError: 429, NoWorkerError: 503, UnknownModelError: 404}
    for kind, status in expected.items():
        answer = http_error(kind("why"))
        assert answer.status == status
        assert set(answer.body["error"]) == {"message", "type", "param", "code"}
        assert answer.body["error"]["message"] == "why"
    for kind, code in STATUS_OF:  # the one table: every code it uses has an HTTP status
        assert code in HTTP_OF, kind


def test_param_and_code_name_the_field_and_relayed_codes_keep_theirs():
    bad = http_error(BadParamError("temperature", "temperature must be a finite number"))
    assert (bad.status, bad.body["error"]["param"], bad.body["error"]["type"]) == (
        400, "temperature", "invalid_request_error")
    assert http_error(UnknownModelError("no such model")).body["error"]["code"] == "model_not_found"
    assert http_error(WorkerFailedError(grpc.StatusCode.INVALID_ARGUMENT, "too long")).status == 400
    assert http_error(GenerationFailedError("non-finite logits")).status == 500
    assert http_error(MoemeshError("misconfigured")).status == 400  # FAILED_PRECONDITION


def test_a_bug_is_a_500_without_its_traceback():
    answer = http_error(KeyError("secret internals"))
    assert answer.status == 500
    assert "secret" not in answer.body["error"]["message"] and "Traceback" not in answer.body["error"]["message"]
