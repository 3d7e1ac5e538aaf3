"""`make compose-test`: compose/compose.yaml on a real Docker engine, end to end.

Sets up the engine and the base image (scripts/docker_setup.sh), builds the image
(scripts/compose_build.sh), then under a project name of its own and on free ports: `up` with
3 workers and waits for health, a generate and a short bench through the gateway's published port,
`--scale worker=4` and sees the 4th join the coordinator's world (4 ranks, the new rank holding
experts) and serve, crashes a worker (SIGKILL to its process) and sees Docker restart it (restart:
on-failure) and the coordinator take it back into a newer world, serving; every generate is greedy
and token for token the first world's. Finally `down -v`, asserting no container, network or volume
of the project is left; `down` runs in a `finally`, and an engine this run started is stopped again.
Every step is bounded and prints a progress line with its time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moemesh.settings import option, parse_settings  # noqa: E402

COMPOSE_FILE = REPO / "compose" / "compose.yaml"
DOCKERD_PID = Path("/var/run/docker.pid")
MOEMESH = [sys.executable, "-m", "moemesh.cli"]
T = TypeVar("T")
# Run inside the coordinator's container: its newest world (WaitForWorld after generation 0 answers at
# once) and the ranks holding a piece of some expert in the placement in force, as JSON.
WORLD_QUERY = """
import json, grpc
from moemesh.v1 import coordinator_pb2 as pb, coordinator_pb2_grpc as rpc
with grpc.insecure_channel("127.0.0.1:50050") as ch:
    stub = rpc.CoordinatorStub(ch)
    world = stub.WaitForWorld(pb.WaitForWorldRequest(), timeout=20)
    placement = stub.GetPlacement(pb.GetPlacementRequest(), timeout=20).placement
holders = {r for layer in placement.layers for e in layer.experts
           for r in [*e.ranks, *(r for g in e.shard_groups for r in g.ranks)]}
if placement.world_generation != world.generation:
    holders = set()  # the new world's placement is not published yet
print(json.dumps({"generation": world.generation, "members": [m.address for m in world.members],
                  "holders": sorted(holders)}))
"""


@dataclass(frozen=True)
class World:
    """The coordinator's world: its generation, members' addresses by rank, ranks holding experts."""

    generation: int
    members: tuple[str, ...]
    holders: frozenset[int]


class ComposeTestError(RuntimeError):
    """A step did not see what it waited for."""


@dataclass(frozen=True)
class ComposeTestSettings:
    ENV_PREFIX: ClassVar[str | None] = None

    workers: int = option("--workers", "workers of the first world", int, default=3)
    image: str = option("--image", "image tag to build and run", default="moemesh:local")
    skip_setup: bool = option("--skip-setup", "the engine and base image are there: skip docker_setup.sh",
                              lambda t: t.lower() in ("1", "true", "yes", "on"), default=False)
    step_timeout_s: float = option("--step-timeout", "bound of each waiting step, seconds", float, default=300.0)


class Run:
    """Progress lines with timings, and commands bounded by a timeout."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[compose-test {time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        self.say(f"{name} ...")
        yield
        self.say(f"{name}: done in {time.monotonic() - start:.1f}s")

    def sh(self, argv: Sequence[str], timeout_s: float, env: dict[str, str] | None = None,
           check: bool = True) -> str:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        if check and done.returncode != 0:
            raise ComposeTestError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}"
                                   f"{done.stderr[-3000:]}")
        return done.stdout


def until(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 2.0) -> T:
    """Call `check` until it returns a value (not None); ComposeTestError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            value = check()
        except (ComposeTestError, subprocess.TimeoutExpired) as exc:
            value, last = None, exc
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise ComposeTestError(f"{what}: not seen within {timeout_s:.0f}s (last: {last})")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_command() -> list[str]:
    """docker-compose (v1, Debian's) or the v2 plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


class Project:
    """One compose project: its name, environment and published gRPC port."""

    def __init__(self, run: Run, s: ComposeTestSettings, model: Path):
        self.run, self.s = run, s
        self.name = f"moemeshct{os.getpid()}"
        self.grpc = f"127.0.0.1:{free_port()}"
        self.first_tokens: list[int] | None = None  # the first world's greedy answer
        self.env = {**os.environ, "MOEMESH_IMAGE": s.image, "MOEMESH_MODEL_DIR": str(model),
                    "MOEMESH_WORKERS": str(s.workers), "MOEMESH_PUBLISH_GRPC": self.grpc,
                    "MOEMESH_PUBLISH_HTTP": f"127.0.0.1:{free_port()}", "PYTHONPATH": str(REPO)}

    def compose(self, *args: str, timeout_s: float = 600.0) -> str:
        return self.run.sh([*compose_command(), "-p", self.name, "-f", str(COMPOSE_FILE), *args], timeout_s,
                           self.env)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, timeout_s=60).split()

    def up(self, workers: int) -> None:
        self.compose("up", "-d", "--no-build", "--scale", f"worker={workers}", timeout_s=self.s.step_timeout_s * 2)

    def moemesh(self, *args: str, timeout_s: float = 180.0) -> str:
        return self.run.sh([*MOEMESH, *args], timeout_s, self.env)

    def world(self) -> World:
        """The coordinator's newest world and its placement, asked inside its container (its port is
        not published) with grpc and the stubs only: no torch import per poll."""
        (coordinator,) = self.containers("coordinator")
        reply = json.loads(self.run.sh(["docker", "exec", coordinator, "python", "-c", WORLD_QUERY], 120))
        return World(reply["generation"], tuple(reply["members"]), frozenset(reply["holders"]))

    def hostname(self, container: str) -> str:
        return self.run.sh(["docker", "inspect", "-f", "{{.Config.Hostname}}", container], 60).strip()

    def generate(self) -> list[int]:
        out = self.moemesh("generate", "--target", self.grpc, "--prompt", "Hello, mesh", "--max-new-tokens", "8",
                           "--json", "--timeout", "120")
        ids = json.loads(out)["token_ids"]
        if len(ids) != 8:
            raise ComposeTestError(f"generate gave {len(ids)} tokens, wanted 8: {out}")
        if self.first_tokens is None:
            self.first_tokens = ids
        elif ids != self.first_tokens:  # greedy: every world serves the same model, token for token
            raise ComposeTestError(f"generate gave {ids}, the first world gave {self.first_tokens}")
        return ids

    def serving(self) -> bool | None:
        done = subprocess.run([*MOEMESH, "probe", self.grpc, "--service", "moemesh.v1.Gateway"],
                              capture_output=True, text=True, timeout=60, env=self.env, check=False)
        return True if done.returncode == 0 else None

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "25", timeout_s=60)
        except (ComposeTestError, subprocess.TimeoutExpired) as exc:
            return f"(no logs: {exc})"

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        queries = {"containers": ["docker", "ps", "-a", "-q", "--filter", label],
                   "networks": ["docker", "network", "ls", "-q", "--filter", label],
                   "volumes": ["docker", "volume", "ls", "-q", "--filter", label]}
        found = {kind: self.run.sh(argv, 60).split() for kind, argv in queries.items()}
        named = self.run.sh(["docker", "network", "ls", "--format", "{{.Name}}"], 60).split()
        found["networks"] += [n for n in named if n.startswith(f"{self.name}_")]
        return {kind: items for kind, items in found.items() if items}


def prepare(run: Run, s: ComposeTestSettings, model: Path) -> None:
    """The engine, the base image, the image, and a tiny checkpoint every container user can read."""
    if not s.skip_setup:
        with run.step("docker engine and base image (scripts/docker_setup.sh)"):
            run.sh(["bash", str(REPO / "scripts" / "docker_setup.sh")], 1800)
    with run.step(f"image {s.image} (scripts/compose_build.sh)"):
        run.sh(["bash", str(REPO / "scripts" / "compose_build.sh"), s.image], 1800)
    with run.step("tiny checkpoint"):
        run.sh([*MOEMESH, "tiny-model", str(model), "--layers", "2", "--experts", "8", "--hidden", "128",
                "--intermediate", "256"], 300, {**os.environ, "PYTHONPATH": str(REPO)})
        for path in [model, *model.rglob("*")]:  # safetensors writes 0600; containers run as another user
            path.chmod(0o755 if path.is_dir() else 0o644)


def serve_and_bench(p: Project) -> None:
    with p.run.step(f"up: coordinator, {p.s.workers} workers, gateway; healthy"):
        p.up(p.s.workers)
        until("gateway SERVING on the published port", p.serving, p.s.step_timeout_s)
        world = until(f"a world of {p.s.workers}", lambda: _world_of(p, p.s.workers), p.s.step_timeout_s)
        p.run.say(f"world generation {world.generation}: {', '.join(world.members)}")
    with p.run.step(f"generate through {p.grpc}"):
        p.run.say(f"tokens {p.generate()}")
    with p.run.step("bench through the published port"):
        report = Path(tempfile.mkdtemp(prefix="moemesh-ct-")) / "bench.json"
        p.moemesh("bench", "--target", p.grpc, "--requests", "12", "--concurrency", "4", "--prompt-len", "8",
                  "--output-len", "8", "--warmup", "2", "--no-progress", "--json", str(report), timeout_s=300)
        m = json.loads(report.read_text())["metrics"]
        shutil.rmtree(report.parent)
        if m["requests"] != 12 or m["failed"]:
            raise ComposeTestError(f"bench: {m['requests']} of 12 requests completed, {m['failed']} failed")
        p.run.say(f"bench: {m['requests']:.0f} requests, {m['output_tokens']:.0f} output tokens, "
                  f"{m['output_tokens_per_s']:.1f} tok/s, TTFT mean {m['ttft_mean_s'] * 1e3:.0f} ms")


def _world_of(p: Project, ranks: int, after: int = 0, member: str = "") -> World | None:
    """The coordinator's world once it has `ranks` members, a generation after `after`, `member`'s
    host among them (when given) and its placement published; else None."""
    world = p.world()
    hosts = {address.rsplit(":", 1)[0] for address in world.members}
    ok = (len(world.members) == ranks and world.generation > after and bool(world.holders)
          and (not member or member in hosts))
    return world if ok else None


def scale_up(p: Project) -> World:
    """One more worker container joins a newer world, holds experts, serves."""
    n = p.s.workers + 1
    before = p.world()
    with p.run.step(f"--scale worker={n}: the new worker joins"):
        p.up(n)
        members = {address.rsplit(":", 1)[0] for address in before.members}
        (new,) = [c for c in p.containers("worker") if p.hostname(c) not in members]
        host = p.hostname(new)
        world = until(f"{host} in a world of {n} after generation {before.generation}",
                      lambda: _world_of(p, n, before.generation, host), p.s.step_timeout_s)
        rank = [a.rsplit(":", 1)[0] for a in world.members].index(host)
        if rank not in world.holders:
            raise ComposeTestError(f"{host} (rank {rank}) holds no expert in generation {world.generation}")
        until("gateway SERVING", p.serving, p.s.step_timeout_s)
        p.run.say(f"world generation {world.generation}: {n} ranks; {host} is rank {rank}, holds experts; "
                  f"tokens {p.generate()}")
    return world


def crash_and_rejoin(p: Project, world: World) -> None:
    n = p.s.workers + 1
    victim = p.containers("worker")[1]
    host = p.hostname(victim)
    with p.run.step(f"worker container {host} crashes (SIGKILL): restarted, rejoins"):
        # A crash: its process SIGKILLed from the host. `docker kill` would not do: Docker counts it as a
        # manual stop, and a manually stopped container is not restarted whatever its restart policy.
        os.kill(int(p.run.sh(["docker", "inspect", "-f", "{{.State.Pid}}", victim], 60)), signal.SIGKILL)

        def restarted() -> bool | None:
            state = json.loads(p.run.sh(["docker", "inspect", "-f", "{{json .}}", victim], 60))
            return True if state["RestartCount"] >= 1 and state["State"]["Running"] else None

        until("the crashed container restarted", restarted, p.s.step_timeout_s)
        newer = until(f"{host} back in a world of {n} after generation {world.generation}",
                      lambda: _world_of(p, n, world.generation, host), p.s.step_timeout_s)
        until("gateway SERVING", p.serving, p.s.step_timeout_s)
        p.run.say(f"world generation {newer.generation}: {n} ranks again, {host} among them; tokens {p.generate()}")


def down(p: Project) -> None:
    with p.run.step("down -v: no container, network or volume left"):
        p.compose("down", "-v", "--remove-orphans", "-t", "10", timeout_s=300)
        left = p.leftovers()
        if left:
            raise ComposeTestError(f"left behind by `down -v`: {left}")


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def stop_engine(run: Run) -> None:
    """Stop the dockerd that docker_setup.sh started for this run (its pid file), bounded."""
    with run.step("stopping the engine this run started"):
        pid = int(DOCKERD_PID.read_text())
        os.kill(pid, signal.SIGTERM)
        until("dockerd gone", lambda: None if Path(f"/proc/{pid}").exists() else True, 60, every_s=0.5)


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(ComposeTestSettings, argv, __doc__.splitlines()[0])
    run = Run()
    started_engine = not s.skip_setup and not engine_answers()
    try:
        return _main(s, run)
    finally:
        if started_engine:
            stop_engine(run)


def _main(s: ComposeTestSettings, run: Run) -> int:
    model_root = Path(tempfile.mkdtemp(prefix="moemesh-ct-model-"))
    model_root.chmod(0o755)
    model = model_root / "tiny"
    try:
        prepare(run, s, model)
        p = Project(run, s, model)
        run.say(f"project {p.name}, gateway gRPC published on {p.grpc}")
        try:
            serve_and_bench(p)
            crash_and_rejoin(p, scale_up(p))
        except BaseException:
            print(p.logs(), file=sys.stderr)
            raise
        finally:
            down(p)
    finally:
        shutil.rmtree(model_root, ignore_errors=True)
    run.say("compose-test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
