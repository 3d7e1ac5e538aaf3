"""The moemesh.v1 gRPC contract: documented, well-formed, wire-stable, and matching its stubs.

The .proto files are compiled here with grpc_tools.protoc into a descriptor set that keeps the
source info (comments), then checked:
- every message, field, oneof, enum, enum value, service and rpc carries a leading comment, and
  every file opens with the versioning policy;
- naming conventions (enum zero values are *_UNSPECIFIED, *_seconds are double, ...);
- CONTRACT_LOCK below pins every field number and type and every rpc signature: moemesh.v1 only
  grows, so a locked entry may never change or disappear, and a new field / rpc / enum value must
  be added to the lock (a deliberate, reviewed contract change);
- the generated modules in moemesh/v1/ (``make stubs``) were built from the current .proto files.
"""

from __future__ import annotations

import importlib
import re
from concurrent import futures
from importlib import resources
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, message_factory

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "moemesh" / "v1"
PACKAGE = "moemesh.v1"
FILES = ("common", "gateway", "coordinator", "worker")

# Field numbers in descriptor.proto, used to address SourceCodeInfo locations.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX = 4, 5, 6, 12
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

# message -> field -> (number, type); rpc -> (request, response); enum -> value -> number.
# Only ever add to these tables (see the versioning policy at the top of every .proto file).
CONTRACT_LOCK: dict[str, dict[str, tuple[int, str]]] = {
    # common.proto
    "Tensor": {"dtype": (1, "DType"), "shape": (2, "repeated int64"), "data": (3, "bytes")},
    "TokenIds": {"ids": (1, "repeated uint32")},
    "SamplingParams": {
        "temperature": (1, "float"),
        "top_p": (2, "float"),
        "top_k": (3, "uint32"),
        "seed": (4, "optional uint64"),
        "max_new_tokens": (5, "uint32"),
        "stop_token_ids": (6, "repeated uint32"),
        "ignore_eos": (7, "bool"),
        "logprobs": (8, "optional uint32"),
        "prompt_logprobs": (9, "bool"),
    },
    "TokenLogprob": {
        "logprob": (1, "float"),
        "top_token_ids": (2, "repeated uint32"),
        "top_logprobs": (3, "repeated float"),
        "token_id": (4, "uint32"),
    },
    "ModelSpec": {
        "architecture": (1, "string"),
        "name": (2, "string"),
        "num_layers": (3, "uint32"),
        "moe_layer_ids": (4, "repeated uint32"),
        "num_experts": (5, "uint32"),
        "top_k": (6, "uint32"),
        "hidden_size": (7, "uint32"),
        "vocab_size": (8, "uint32"),
        "max_context": (9, "uint32"),
        "dtype": (10, "string"),
    },
    # gateway.proto
    "GenerateRequest": {
        "text": (1, "string"),
        "token_ids": (2, "TokenIds"),
        "sampling": (3, "SamplingParams"),
        "request_id": (4, "string"),
        "include_text": (5, "bool"),
    },
    "GenerateResponse": {
        "chunk": (1, "GenerateResponse.TokenChunk"),
        "finished": (2, "GenerateResponse.Finished"),
    },
    "GenerateResponse.TokenChunk": {
        "token_ids": (1, "repeated uint32"),
        "text": (2, "string"),
        "offset": (3, "uint32"),
        "logprobs": (4, "repeated TokenLogprob"),
        "prompt_logprobs": (5, "repeated TokenLogprob"),
    },
    "GenerateResponse.Finished": {
        "reason": (1, "FinishReason"),
        "prompt_tokens": (2, "uint32"),
        "completion_tokens": (3, "uint32"),
        "ttft_seconds": (4, "double"),
        "latency_seconds": (5, "double"),
        "request_id": (6, "string"),
        "error": (7, "string"),
    },
    "GenerateBatchRequest": {"requests": (1, "repeated GenerateRequest")},
    "GenerateBatchResponse": {"index": (1, "uint32"), "response": (2, "GenerateResponse")},
    "ModelInfoRequest": {},
    "ModelInfoResponse": {
        "model": (1, "ModelSpec"),
        "num_workers": (2, "uint32"),
        "placement_epoch": (3, "uint64"),
        "balancing_policy": (4, "string"),
        "transport": (5, "string"),
        "world_generation": (6, "uint64"),
        "live_workers": (7, "uint32"),
        "not_serving_reason": (8, "string"),
    },
    # coordinator.proto
    "RegisterWorkerRequest": {
        "worker_id": (1, "string"),
        "incarnation": (2, "uint64"),
        "address": (3, "string"),
        "device": (4, "string"),
        "node": (5, "string"),
        "memory_bytes": (6, "uint64"),
        "weight_bytes_per_element": (7, "uint32"),
        "metrics_address": (8, "string"),
    },
    "RegisterWorkerResponse": {
        "rank": (1, "uint32"),
        "world_size": (2, "uint32"),
        "world_generation": (3, "uint64"),
        "model": (4, "ModelSpec"),
        "model_path": (5, "string"),
        "heartbeat_interval_seconds": (6, "double"),
    },
    "HeartbeatRequest": {
        "worker_id": (1, "string"),
        "incarnation": (2, "uint64"),
        "world_generation": (3, "uint64"),
        "loaded_epoch": (4, "uint64"),
    },
    "HeartbeatResponse": {"world_generation": (1, "uint64"), "placement_epoch": (2, "uint64")},
    "ReportLoadRequest": {
        "worker_id": (1, "string"),
        "incarnation": (2, "uint64"),
        "rank": (3, "uint32"),
        "world_generation": (4, "uint64"),
        "placement_epoch": (5, "uint64"),
        "window_tokens": (6, "uint64"),
        "expert_counts": (7, "Tensor"),
        "link_counts": (8, "Tensor"),
    },
    "ReportLoadResponse": {},
    "WatchPlacementRequest": {"after_epoch": (1, "uint64")},
    "ExpertSlots": {"ranks": (1, "repeated uint32"), "shard_groups": (2, "repeated ShardGroup")},
    "ShardGroup": {"ranks": (1, "repeated uint32")},
    "LayerPlacement": {
        "layer": (1, "uint32"),
        "experts": (2, "repeated ExpertSlots"),
        "gating_factors": (3, "repeated float"),
    },
    "Placement": {
        "epoch": (1, "uint64"),
        "world_generation": (2, "uint64"),
        "world_size": (3, "uint32"),
        "layers": (4, "repeated LayerPlacement"),
        "origin": (5, "string"),
    },
    "GetPlacementRequest": {"epoch": (1, "uint64")},
    "GetPlacementResponse": {
        "placement": (1, "Placement"),
        "window_tokens": (2, "uint64"),
        "expert_counts": (3, "Tensor"),
        "balancing_policy": (4, "string"),
        "link_counts": (5, "Tensor"),
        "source_expert_counts": (6, "Tensor"),
    },
    "SetPlacementRequest": {"placement": (1, "Placement"), "expected_epoch": (2, "uint64")},
    "SetPlacementResponse": {"placement": (1, "Placement")},
    "WaitForWorldRequest": {
        "after_generation": (1, "uint64"),
        "worker_id": (2, "string"),
        "incarnation": (3, "uint64"),
    },
    "ReportWorldLostRequest": {
        "worker_id": (1, "string"),
        "incarnation": (2, "uint64"),
        "world_generation": (3, "uint64"),
        "reason": (4, "string"),
    },
    "ReportWorldLostResponse": {"world_generation": (1, "uint64")},
    "LeaveWorldRequest": {"worker_id": (1, "string"), "incarnation": (2, "uint64")},
    "LeaveWorldResponse": {},
    "WorldMember": {
        "rank": (1, "uint32"),
        "worker_id": (2, "string"),
        "incarnation": (3, "uint64"),
        "address": (4, "string"),
        "device": (5, "string"),
        "node": (6, "string"),
        "metrics_address": (7, "string"),
    },
    "Rendezvous": {"store_host": (1, "string"), "store_port": (2, "uint32"), "store_prefix": (3, "string")},
    "World": {
        "generation": (1, "uint64"),
        "world_size": (2, "uint32"),
        "rank": (3, "int32"),
        "members": (4, "repeated WorldMember"),
        "transport": (5, "string"),
        "rendezvous": (6, "Rendezvous"),
        "placement_epoch": (7, "uint64"),
        "unservable_reason": (8, "string"),
    },
    # worker.proto
    "WorkerRequest": {"submit": (1, "WorkerRequest.Submit"), "cancel": (2, "WorkerRequest.Cancel")},
    "WorkerRequest.Submit": {
        "request_id": (1, "string"),
        "prompt_token_ids": (2, "repeated uint32"),
        "sampling": (3, "SamplingParams"),
        "generated_token_ids": (4, "repeated uint32"),
    },
    "WorkerRequest.Cancel": {"request_id": (1, "string")},
    "WorkerEvent": {
        "tokens": (1, "WorkerEvent.Tokens"),
        "finished": (2, "WorkerEvent.Finished"),
        "rejected": (3, "WorkerEvent.Rejected"),
        "batch": (4, "WorkerEvent.Batch"),
    },
    "WorkerEvent.Batch": {"events": (1, "repeated WorkerEvent")},
    "WorkerEvent.Tokens": {"request_id": (1, "string"), "token_ids": (2, "repeated uint32"),
                           "logprobs": (3, "repeated TokenLogprob"), "prompt_logprobs": (4, "repeated TokenLogprob")},
    "WorkerEvent.Finished": {
        "request_id": (1, "string"),
        "reason": (2, "FinishReason"),
        "prompt_tokens": (3, "uint32"),
        "completion_tokens": (4, "uint32"),
        "error": (5, "string"),
    },
    "WorkerEvent.Rejected": {"request_id": (1, "string"), "code": (2, "int32"), "message": (3, "string")},
    "StatusRequest": {},
    "LayerExperts": {"layer": (1, "uint32"), "expert_ids": (2, "repeated uint32")},
    "WorkerStatus": {
        "rank": (1, "int32"),
        "world_generation": (2, "uint64"),
        "placement_epoch": (3, "uint64"),
        "loaded_epoch": (4, "uint64"),
        "running_requests": (5, "uint32"),
        "waiting_requests": (6, "uint32"),
        "free_slots": (7, "uint32"),
        "expert_bytes": (8, "uint64"),
        "experts": (9, "repeated LayerExperts"),
        "rss_bytes": (10, "uint64"),
        "device": (11, "string"),
        "device_memory_bytes": (12, "uint64"),
        "steps": (13, "uint64"),
        "step_seconds": (14, "double"),
        "collective_seconds": (15, "double"),
        "tokens": (16, "uint64"),
        "exchange_seconds": (17, "double"),
        "hidden_seconds": (18, "double"),
    },
}

RPC_LOCK: dict[str, tuple[str, str]] = {
    "Gateway.Generate": ("GenerateRequest", "stream GenerateResponse"),
    "Gateway.GenerateBatch": ("GenerateBatchRequest", "stream GenerateBatchResponse"),
    "Gateway.ModelInfo": ("ModelInfoRequest", "ModelInfoResponse"),
    "Coordinator.RegisterWorker": ("RegisterWorkerRequest", "RegisterWorkerResponse"),
    "Coordinator.Heartbeat": ("HeartbeatRequest", "HeartbeatResponse"),
    "Coordinator.ReportLoad": ("ReportLoadRequest", "ReportLoadResponse"),
    "Coordinator.WatchPlacement": ("WatchPlacementRequest", "stream Placement"),
    "Coordinator.GetPlacement": ("GetPlacementRequest", "GetPlacementResponse"),
    "Coordinator.SetPlacement": ("SetPlacementRequest", "SetPlacementResponse"),
    "Coordinator.WaitForWorld": ("WaitForWorldRequest", "World"),
    "Coordinator.ReportWorldLost": ("ReportWorldLostRequest", "ReportWorldLostResponse"),
    "Coordinator.LeaveWorld": ("LeaveWorldRequest", "LeaveWorldResponse"),
    "Worker.Serve": ("stream WorkerRequest", "stream WorkerEvent"),
    "Worker.Status": ("StatusRequest", "WorkerStatus"),
}

ENUM_LOCK: dict[str, dict[str, int]] = {
    "DType": {
        "DTYPE_UNSPECIFIED": 0,
        "DTYPE_FLOAT32": 1,
        "DTYPE_FLOAT16": 2,
        "DTYPE_BFLOAT16": 3,
        "DTYPE_INT64": 4,
        "DTYPE_INT32": 5,
        "DTYPE_FLOAT64": 6,
        "DTYPE_INT16": 7,
        "DTYPE_INT8": 8,
        "DTYPE_UINT8": 9,
        "DTYPE_BOOL": 10,
    },
    "FinishReason": {
        "FINISH_REASON_UNSPECIFIED": 0,
        "FINISH_REASON_LENGTH": 1,
        "FINISH_REASON_STOP": 2,
        "FINISH_REASON_CANCELLED": 3,
        "FINISH_REASON_ERROR": 4,
    },
}


# --------------------------------------------------------------------------------------------
# Compiling the .proto files


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    """Every moemesh/v1 .proto compiled by protoc, comments (SourceCodeInfo) included."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("protoc") / "moemesh_v1.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *(str(PROTO_DIR / f"{name}.proto") for name in FILES),
    ]
    assert protoc.main(args) == 0, "protoc failed to compile protos/moemesh/v1 (see stderr)"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="module")
def files(descriptor_set: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return {Path(f.name).stem: f for f in descriptor_set.file}


def test_proto_directory_holds_exactly_the_known_files() -> None:
    found = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
    assert found == sorted(FILES), "a new .proto file must be added to FILES (and to the lock tables)"


def test_every_file_is_package_moemesh_v1(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    for name, f in files.items():
        assert f.package == PACKAGE, name
        assert f.syntax == "proto3", name
        assert f.name == f"moemesh/v1/{name}.proto"


# --------------------------------------------------------------------------------------------
# Comments


def _documented_elements(f: descriptor_pb2.FileDescriptorProto):
    """Yield (SourceCodeInfo path, readable name) for every element that needs a comment."""

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str):
        name = f"{prefix}{m.name}"
        yield path, f"message {name}"
        for i, field in enumerate(m.field):
            yield (*path, _MSG_FIELD, i), f"field {name}.{field.name}"
        for i, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional` fields
                yield (*path, _MSG_ONEOF, i), f"oneof {name}.{oneof.name}"
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, (*path, _MSG_NESTED, i), f"{name}.")
        for i, e in enumerate(m.enum_type):
            yield from enum(e, (*path, _MSG_ENUM, i), f"{name}.")

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str):
        yield path, f"enum {prefix}{e.name}"
        for i, value in enumerate(e.value):
            yield (*path, _ENUM_VALUE, i), f"enum value {prefix}{e.name}.{value.name}"

    for i, m in enumerate(f.message_type):
        yield from message(m, (_FILE_MESSAGE, i), "")
    for i, e in enumerate(f.enum_type):
        yield from enum(e, (_FILE_ENUM, i), "")
    for i, s in enumerate(f.service):
        yield (_FILE_SERVICE, i), f"service {s.name}"
        for j, method in enumerate(s.method):
            yield (_FILE_SERVICE, i, _SERVICE_METHOD, j), f"rpc {s.name}.{method.name}"


@pytest.mark.parametrize("name", FILES)
def test_every_element_has_a_leading_comment(files, name: str) -> None:
    f = files[name]
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
    elements = list(_documented_elements(f))
    assert any(what.startswith("field ") for _, what in elements)
    missing = [what for path, what in elements if not comments.get(path)]
    assert not missing, f"{f.name}: add a leading // comment to: " + ", ".join(missing)


@pytest.mark.parametrize("name", FILES)
def test_every_file_states_the_versioning_policy(files, name: str) -> None:
    f = files[name]
    header = ""
    for loc in f.source_code_info.location:
        if tuple(loc.path) == (_FILE_SYNTAX,):
            header = "\n".join(loc.leading_detached_comments) + loc.leading_comments
    assert "Versioning policy" in header, f"{f.name}: the header comment must state the versioning policy"
    assert "never renumbered" in header
    assert "moemesh.v2" in header


def test_every_rpc_is_documented_in_all_files(files) -> None:
    rpcs = [what for f in files.values() for _, what in _documented_elements(f) if what.startswith("rpc ")]
    assert sorted(w.removeprefix("rpc ") for w in rpcs) == sorted(RPC_LOCK)


# --------------------------------------------------------------------------------------------
# Naming conventions

_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def _messages(f: descriptor_pb2.FileDescriptorProto):
    def walk(m: descriptor_pb2.DescriptorProto, prefix: str):
        yield f"{prefix}{m.name}", m
        for nested in m.nested_type:
            yield from walk(nested, f"{prefix}{m.name}.")

    for m in f.message_type:
        yield from walk(m, "")


def _enums(f: descriptor_pb2.FileDescriptorProto):
    yield from ((e.name, e) for e in f.enum_type)
    for name, m in _messages(f):
        yield from ((f"{name}.{e.name}", e) for e in m.enum_type)


def test_naming_conventions(files) -> None:
    problems = []
    FD = descriptor_pb2.FieldDescriptorProto
    for f in files.values():
        for name, m in _messages(f):
            if not _PASCAL.match(m.name):
                problems.append(f"message {name}: PascalCase")
            for field in m.field:
                where = f"{name}.{field.name}"
                if not _SNAKE.match(field.name):
                    problems.append(f"{where}: lower_snake_case")
                if field.name.endswith("_seconds") and field.type != FD.TYPE_DOUBLE:
                    problems.append(f"{where}: durations in seconds are double")
                if field.name.endswith("_bytes") and field.type not in (FD.TYPE_UINT64, FD.TYPE_BYTES):
                    problems.append(f"{where}: byte sizes are uint64")
                if field.name.endswith("epoch") and field.type != FD.TYPE_UINT64:
                    problems.append(f"{where}: epochs are uint64")
        for name, e in _enums(f):
            # Values share the enum's name in SCREAMING_SNAKE_CASE as prefix (enum values are
            # package-scoped in protobuf), and the zero value is <PREFIX>_UNSPECIFIED.
            zero = e.value[0]
            prefix = zero.name.removesuffix("UNSPECIFIED")
            if zero.number != 0 or not zero.name.endswith("_UNSPECIFIED"):
                problems.append(f"enum {name}: first value must be <PREFIX>_UNSPECIFIED = 0")
            if prefix.replace("_", "") != e.name.upper():
                problems.append(f"enum {name}: value prefix {prefix!r} does not spell the enum's name")
            for v in e.value:
                if not v.name.startswith(prefix):
                    problems.append(f"enum {name}.{v.name}: prefix {prefix}")
        for s in f.service:
            for method in s.method:
                if not _PASCAL.match(method.name):
                    problems.append(f"rpc {s.name}.{method.name}: PascalCase")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# Wire stability: the lock tables


def _field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    FD = descriptor_pb2.FieldDescriptorProto
    if field.type_name:
        kind = field.type_name.removeprefix(f".{PACKAGE}.")
    else:
        kind = FD.Type.Name(field.type).removeprefix("TYPE_").lower()
    if field.label == FD.LABEL_REPEATED:
        return f"repeated {kind}"
    if field.proto3_optional:
        return f"optional {kind}"
    return kind


def test_fields_match_the_lock(files) -> None:
    actual = {
        name: {fl.name: (fl.number, _field_type(fl)) for fl in m.field}
        for f in files.values()
        for name, m in _messages(f)
    }
    problems = []
    for message, fields in CONTRACT_LOCK.items():
        if message not in actual:
            problems.append(f"message {message} was removed or renamed (never allowed in moemesh.v1)")
            continue
        for field, locked in fields.items():
            now = actual[message].get(field)
            if now != locked:
                problems.append(f"{message}.{field}: locked as {locked}, now {now} (never allowed in v1)")
    for message, fields in actual.items():
        for field, now in fields.items():
            if field not in CONTRACT_LOCK.get(message, {}):
                problems.append(f"{message}.{field} = {now} is new: add it to CONTRACT_LOCK")
    assert not problems, "\n".join(problems)


def test_field_numbers_are_never_reused(files) -> None:
    # A message's reserved numbers must not collide with live fields (protoc checks this too)
    # and each message's live numbers are unique.
    for f in files.values():
        for name, m in _messages(f):
            numbers = [fl.number for fl in m.field]
            assert len(numbers) == len(set(numbers)), name
            for r in m.reserved_range:
                assert not any(r.start <= n < r.end for n in numbers), name


def test_rpcs_match_the_lock(files) -> None:
    def kind(type_name: str, streaming: bool) -> str:
        return ("stream " if streaming else "") + type_name.removeprefix(f".{PACKAGE}.")

    actual = {
        f"{s.name}.{m.name}": (
            kind(m.input_type, m.client_streaming),
            kind(m.output_type, m.server_streaming),
        )
        for f in files.values()
        for s in f.service
        for m in s.method
    }
    assert actual == RPC_LOCK


def test_enums_match_the_lock(files) -> None:
    actual = {name: {v.name: v.number for v in e.value} for f in files.values() for name, e in _enums(f)}
    assert actual == ENUM_LOCK


# --------------------------------------------------------------------------------------------
# The generated modules


def _generated(module: str):
    try:
        return importlib.import_module(f"moemesh.v1.{module}")
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the checkout
        pytest.fail(f"generated stubs missing ({exc}): run `make stubs`")


@pytest.mark.parametrize("name", FILES)
def test_generated_stubs_are_up_to_date(files, name: str) -> None:
    module = _generated(f"{name}_pb2")
    generated = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    fresh = descriptor_pb2.FileDescriptorProto()
    fresh.CopyFrom(files[name])
    fresh.ClearField("source_code_info")
    for proto in (generated, fresh):  # protoc's descriptor set adds json_name; stubs omit it
        for _, m in _messages(proto):
            for field in m.field:
                field.ClearField("json_name")
    assert generated == fresh, f"moemesh/v1/{name}_pb2.py is stale: run `make stubs`"


@pytest.mark.parametrize(
    ("name", "service"), [("gateway", "Gateway"), ("coordinator", "Coordinator"), ("worker", "Worker")]
)
def test_generated_stub_and_servicer_serve_every_method(name: str, service: str) -> None:
    """A servicer derived from the generated base, registered with add_<Service>Servicer_to_server
    on a real loopback server, answers every method of the service through the generated stub, in
    the method's streaming shape: stub, servicer and registration agree on every method's path,
    arity and message types (an unregistered method would answer UNIMPLEMENTED)."""
    grpc_module = _generated(f"{name}_pb2_grpc")
    pb2 = _generated(f"{name}_pb2")
    methods = pb2.DESCRIPTOR.services_by_name[service].methods
    servicer_class = type("Answering", (getattr(grpc_module, f"{service}Servicer"),),
                          {m.name: _answering_handler(m) for m in methods})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    getattr(grpc_module, f"add_{service}Servicer_to_server")(servicer_class(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = getattr(grpc_module, f"{service}Stub")(channel)
            for method in methods:
                request = message_factory.GetMessageClass(method.input_type)()
                result = getattr(stub, method.name)(iter([request, request]) if method.client_streaming else request,
                                                    timeout=10)
                answers = list(result) if method.server_streaming else [result]
                want = message_factory.GetMessageClass(method.output_type)
                # one answer per request received: the server saw the client's stream whole
                sent = 2 if method.server_streaming and method.client_streaming else 1
                assert [type(a) for a in answers] == [want] * sent, method.name
    finally:
        server.stop(None)


def _answering_handler(method):
    """A handler in `method`'s streaming shape answering one empty output message per request."""
    out = message_factory.GetMessageClass(method.output_type)
    if method.client_streaming and method.server_streaming:
        return lambda self, requests, context: (out() for _ in requests)
    if method.client_streaming:  # (no such method yet) one answer for the whole stream
        return lambda self, requests, context: [out() for _ in requests][:1][0]
    if method.server_streaming:
        return lambda self, request, context: iter([out()])
    return lambda self, request, context: out()


def test_messages_round_trip_through_the_generated_classes() -> None:
    common = _generated("common_pb2")
    gateway = _generated("gateway_pb2")
    coordinator = _generated("coordinator_pb2")
    worker = _generated("worker_pb2")

    request = gateway.GenerateRequest(
        token_ids=common.TokenIds(ids=[1, 2, 3]),
        sampling=common.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=0, max_new_tokens=16),
        include_text=True,
    )
    again = gateway.GenerateRequest.FromString(request.SerializeToString())
    assert again.WhichOneof("prompt") == "token_ids"
    assert again.sampling.HasField("seed") and again.sampling.seed == 0  # 0 is a real seed, not "unset"
    assert not gateway.GenerateRequest().sampling.HasField("seed")

    placement = coordinator.Placement(
        epoch=7,
        world_generation=1,
        world_size=2,
        layers=[
            coordinator.LayerPlacement(
                layer=0,
                experts=[coordinator.ExpertSlots(ranks=[0]), coordinator.ExpertSlots(ranks=[0, 1])],
                gating_factors=[1.0, 0.5],
            )
        ],
    )
    assert coordinator.Placement.FromString(placement.SerializeToString()) == placement

    event = worker.WorkerEvent(
        finished=worker.WorkerEvent.Finished(
            request_id="r", reason=common.FINISH_REASON_STOP, completion_tokens=3
        )
    )
    assert worker.WorkerEvent.FromString(event.SerializeToString()).WhichOneof("kind") == "finished"
