"""The mTLS mesh end to end (moemesh.tls, moemesh.certs, moemesh.rpc's role rules, the gateway's API
keys): a coordinator, 2 gloo workers and a gateway as real processes on loopback, every one with a
certificate `moemesh certs` wrote (MeshSpec.certs), and a second gateway that also requires API
keys (one mesh for both, to spare this 2-core machine a second one). Nothing is mocked.

- the mesh serves the reference greedy tokens over mTLS;
- a caller without a certificate, with another CA's, or with a key that is not its certificate's is
  refused at the coordinator, a worker and the gateway (grpc fails the handshake: UNAVAILABLE), and
  each still serves afterwards;
- SetPlacement with a client certificate is PERMISSION_DENIED, with the admin one it publishes;
  RegisterWorker needs the worker role;
- a worker refuses Serve from any identity but a gateway's;
- a Cancel sent on another Serve stream does nothing (the request completes), on its own stream it
  cancels;
- API keys: none or a wrong one UNAUTHENTICATED, the right one serves, over the per-minute limit
  RESOURCE_EXHAUSTED with `retry-after`, over the key's max tokens RESOURCE_EXHAUSTED; health open.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator import placement_admin
from moemesh.auth import key_digest
from moemesh.certs import role_files, write_certs
from moemesh.client import Client
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.errors import PermissionDeniedError
from moemesh.launch import MeshSpec, running
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.rpc import channel
from moemesh.tls import TlsFiles
from moemesh.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

pytestmark = pytest.mark.slow  # starts a mesh of real processes

TINY = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512)
START_TIMEOUT_S = 180.0  # hang bound
CALL_S = 60.0  # hang bound of each call
PROMPT = [5, 17, 42, 7, 99, 3]
KEY, LIMITED = "mm-test-key-unlimited", "mm-test-key-limited"


def _tls(folder: Path, role: str) -> TlsFiles:
    f = role_files(folder, role)
    return TlsFiles(f.cert, f.key, f.ca)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tls-mesh")
    model = write_tiny_model(tmp / "model", TINY)
    write_certs(tmp / "certs")
    write_certs(tmp / "other-ca")
    keys = tmp / "keys.txt"
    keys.write_text(f"{key_digest(KEY)}  name=unlimited\n{key_digest(LIMITED)}  rpm=2  max_tokens=4\n")
    spec = MeshSpec(model=model, workers=2, state_dir=tmp, log_dir=tmp / "logs", certs=tmp / "certs",
                    worker_flags=("--threads", "1", "--max-seqs", "8"), gateway_flags=("--max-model-len", "256"),
                    env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}, start_timeout_s=START_TIMEOUT_S)
    with running(spec) as mesh:
        keyed = mesh.add_gateway("gateway1", ["--max-model-len", "256", "--api-keys-file", str(keys)])
        mesh.wait_serving(keyed)
        yield mesh, tmp, keyed


def _reference(model_dir: Path, n: int) -> list[int]:
    cfg = load_config(model_dir)
    model = build_model(model_dir, RuntimeShape(max_seqs=1, max_model_len=min(cfg.max_position_embeddings, 256)))
    return generate(Engine(model), [PROMPT], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


async def _world(coordinator: str, tls: TlsFiles) -> coordinator_pb2.World:
    async with channel(coordinator, tls) as ch:
        return await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=CALL_S)


async def _health(target: str, tls: TlsFiles | None) -> grpc.StatusCode:
    async with channel(target, tls) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=CALL_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_the_mtls_mesh_serves_the_reference_tokens(secured):
    mesh, tmp, _ = secured

    async def scenario():
        async with Client(mesh.gateway, tls=_tls(tmp / "certs", "client")) as client:
            done = await client.generate_text(token_ids=PROMPT, params=SamplingParams(max_new_tokens=8,
                                                                                      ignore_eos=True))
        return list(done.token_ids)

    assert asyncio.run(scenario()) == _reference(mesh.model_dir, 8)


def test_callers_without_a_ca_signed_certificate_are_refused_at_every_service(secured):
    mesh, tmp, _ = secured
    client = _tls(tmp / "certs", "client")
    bad = {
        "no certificate": None,
        "another CA": _tls(tmp / "other-ca", "admin"),
        "wrong key": TlsFiles(client.cert, _tls(tmp / "certs", "admin").key, client.ca),
    }

    async def scenario():
        world = await _world(mesh.coordinator, _tls(tmp / "certs", "admin"))
        targets = {"coordinator": mesh.coordinator, "worker": world.members[0].address, "gateway": mesh.gateway}
        codes = {(service, name): await _health(target, tls)
                 for service, target in targets.items() for name, tls in bad.items()}
        after = {service: await _health(target, client) for service, target in targets.items()}
        return codes, after

    codes, after = asyncio.run(scenario())
    assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAVAILABLE) and len(codes) == 9
    assert after == {"coordinator": grpc.StatusCode.OK, "worker": grpc.StatusCode.OK, "gateway": grpc.StatusCode.OK}
    mesh.check_alive()


def test_placement_changes_need_the_admin_role_and_membership_the_worker_role(secured, tmp_path):
    mesh, tmp, _ = secured
    admin, client = _tls(tmp / "certs", "admin"), _tls(tmp / "certs", "client")

    async def scenario():
        current = await placement_admin.get_placement(mesh.coordinator, CALL_S, admin)
        path = tmp_path / "placement.yaml"
        path.write_text(placement_admin.placement_yaml(current))
        request = coordinator_pb2.SetPlacementRequest(placement=current.placement)
        codes = {}
        for role in ("client", "gateway", "worker"):
            async with channel(mesh.coordinator, _tls(tmp / "certs", role)) as ch:
                stub = coordinator_pb2_grpc.CoordinatorStub(ch)
                try:
                    await stub.SetPlacement(request, timeout=CALL_S)
                except grpc.aio.AioRpcError as exc:
                    codes[role] = exc.code()
        async with channel(mesh.coordinator, _tls(tmp / "certs", "gateway")) as ch:
            try:
                await coordinator_pb2_grpc.CoordinatorStub(ch).RegisterWorker(
                    coordinator_pb2.RegisterWorkerRequest(worker_id="intruder", address="127.0.0.1:1"),
                    timeout=CALL_S)
            except grpc.aio.AioRpcError as exc:
                codes["register as gateway"] = exc.code()
        try:
            await placement_admin.set_placement(mesh.coordinator, path, 0, CALL_S, client)
        except PermissionDeniedError as exc:
            codes["placement set as client"] = grpc.StatusCode.PERMISSION_DENIED
            assert "admin" in str(exc)
        published = await placement_admin.set_placement(mesh.coordinator, path, 0, CALL_S, admin)
        return codes, current.placement.epoch, published.epoch

    codes, before, after = asyncio.run(scenario())
    assert codes == dict.fromkeys(("client", "gateway", "worker", "register as gateway", "placement set as client"),
                                  grpc.StatusCode.PERMISSION_DENIED)
    assert after > before


def _submit(request_id: str, n: int) -> worker_pb2.WorkerRequest:
    sampling = sampling_to_proto(SamplingParams(max_new_tokens=n, ignore_eos=True))
    return worker_pb2.WorkerRequest(submit=worker_pb2.WorkerRequest.Submit(
        request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling))


def _cancel(request_id: str) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(cancel=worker_pb2.WorkerRequest.Cancel(request_id=request_id))


def _events(message: worker_pb2.WorkerEvent) -> list[worker_pb2.WorkerEvent]:
    return list(message.batch.events) if message.WhichOneof("kind") == "batch" else [message]


async def _until_finished(call, request_id: str) -> worker_pb2.WorkerEvent.Finished:
    while True:
        message = await asyncio.wait_for(call.read(), CALL_S)
        assert message is not grpc.aio.EOF, "the Serve stream ended"
        for event in _events(message):
            if event.WhichOneof("kind") == "finished" and event.finished.request_id == request_id:
                return event.finished
            assert event.WhichOneof("kind") != "rejected", event


async def _first_tokens(call, request_id: str) -> None:
    while True:
        message = await asyncio.wait_for(call.read(), CALL_S)
        assert message is not grpc.aio.EOF, "the Serve stream ended"
        if any(e.WhichOneof("kind") == "tokens" and e.tokens.request_id == request_id for e in _events(message)):
            return


def test_a_worker_serves_only_gateways_and_honours_a_cancel_only_on_its_own_stream(secured):
    mesh, tmp, _ = secured
    gateway = _tls(tmp / "certs", "gateway")
    n = 48

    async def scenario():
        world = await _world(mesh.coordinator, _tls(tmp / "certs", "admin"))
        address = world.members[0].address
        denied = {}
        for role in ("client", "admin", "worker"):
            async with channel(address, _tls(tmp / "certs", role)) as ch:
                call = worker_pb2_grpc.WorkerStub(ch).Serve()
                try:
                    await asyncio.wait_for(call.read(), CALL_S)
                except grpc.aio.AioRpcError as exc:
                    denied[role] = exc.code()
        async with channel(address, gateway) as ch_a, channel(address, gateway) as ch_b:
            a, b = worker_pb2_grpc.WorkerStub(ch_a).Serve(), worker_pb2_grpc.WorkerStub(ch_b).Serve()
            await a.write(_submit("tls-test-kept", n))
            await _first_tokens(a, "tls-test-kept")
            await b.write(_cancel("tls-test-kept"))  # another stream's request: ignored
            kept = await _until_finished(a, "tls-test-kept")
            await a.write(_submit("tls-test-cancelled", n))
            await _first_tokens(a, "tls-test-cancelled")
            await a.write(_cancel("tls-test-cancelled"))  # its own stream's: cancelled
            cancelled = await _until_finished(a, "tls-test-cancelled")
            a.cancel()
            b.cancel()
        return denied, kept, cancelled

    denied, kept, cancelled = asyncio.run(scenario())
    assert denied == dict.fromkeys(("client", "admin", "worker"), grpc.StatusCode.PERMISSION_DENIED)
    assert kept.reason == common_pb2.FINISH_REASON_LENGTH and kept.completion_tokens == n
    assert cancelled.reason == common_pb2.FINISH_REASON_CANCELLED


def test_api_keys_at_the_gateway(secured):
    mesh, tmp, keyed = secured
    client = _tls(tmp / "certs", "client")
    request = gateway_pb2.GenerateRequest(sampling=sampling_to_proto(SamplingParams(max_new_tokens=8,
                                                                                    ignore_eos=True)))
    request.token_ids.ids.extend(PROMPT)

    async def info(stub, key: str | None):
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        try:
            await stub.ModelInfo(gateway_pb2.ModelInfoRequest(), timeout=CALL_S, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), dict(exc.trailing_metadata() or ())
        return grpc.StatusCode.OK, {}

    async def scenario():
        async with channel(keyed, client) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            codes = {"no key": await info(stub, None), "wrong key": await info(stub, KEY + "x")}
            try:
                await stub.Generate(request, timeout=CALL_S).read()
            except grpc.aio.AioRpcError as exc:
                codes["generate without a key"] = exc.code(), {}
            codes["limited 1"] = await info(stub, LIMITED)
            codes["limited 2"] = await info(stub, LIMITED)
            codes["limited 3"] = await info(stub, LIMITED)  # 2 per minute: the third within the minute is over
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=CALL_S)
        async with Client(keyed, tls=client, api_key=KEY) as c:
            done = await c.generate_text(token_ids=PROMPT, params=SamplingParams(max_new_tokens=8, ignore_eos=True))
        async with Client(keyed, tls=client, api_key=LIMITED) as c:
            try:
                await c.generate_text(token_ids=PROMPT, params=SamplingParams(max_new_tokens=8, ignore_eos=True))
            except Exception as exc:  # CapacityError: over the key's 4 tokens (its bucket is empty too)
                over_tokens = exc
        return codes, health.status, list(done.token_ids), over_tokens

    codes, health, tokens, over_tokens = asyncio.run(scenario())
    assert codes["no key"][0] == codes["wrong key"][0] == codes["generate without a key"][0] \
        == grpc.StatusCode.UNAUTHENTICATED
    assert codes["limited 1"][0] == codes["limited 2"][0] == grpc.StatusCode.OK
    code, trailing = codes["limited 3"]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and 1 <= int(trailing["retry-after"]) <= 30
    assert health == health_pb2.HealthCheckResponse.SERVING  # open without a key by default
    assert tokens == _reference(mesh.model_dir, 8)
    assert "at most 4 new tokens" in str(over_tokens)
