"""`make compose-test`: compose/compose.yaml on a real Docker engine, end to end.

Sets up the engine and the base image (scripts/docker_setup.sh), builds the image
(scripts/compose_build.sh), then under a project name of its own and on free ports: `up` with
3 workers and waits for health, a generate and a short bench through the gateway's published port,
`--scale worker=4` and sees the 4th join the coordinator's world (4 ranks, the new rank holding
experts) and serve, `docker kill`s a worker and sees it restarted and back in a newer world, serving,
and finally `down -v`, asserting no container, network or volume of the project is left. `down` runs
in a `finally`. Every step is bounded and prints a progress line with its time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
MOEMESH = [sys.executable, "-m", "moemesh.cli"]
WORLD = re.compile(r"world generation (\d+), (\d+) ranks")
EXPERT_ROW = re.compile(r"^\s+\d+\s+([\d,]+)\s", re.MULTILINE)
T = TypeVar("T")


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

    def world(self) -> tuple[int, int, set[int]]:
        """The coordinator's world: (generation, ranks, ranks holding an expert), asked inside its container."""
        (coordinator,) = self.containers("coordinator")
        text = self.run.sh(["docker", "exec", coordinator, "moemesh", "placement", "show", "--coordinator",
                            "127.0.0.1:50050"], 120)
        found = WORLD.search(text)
        if found is None:
            raise ComposeTestError(f"no world in `placement show`:\n{text[:500]}")
        holders = {int(r) for row in EXPERT_ROW.findall(text) for r in row.split(",")}
        return int(found[1]), int(found[2]), holders

    def generate(self) -> list[int]:
        out = self.moemesh("generate", "--target", self.grpc, "--prompt", "Hello, mesh", "--max-new-tokens", "8",
                           "--json", "--timeout", "120")
        ids = json.loads(out)["token_ids"]
        if len(ids) != 8:
            raise ComposeTestError(f"generate gave {len(ids)} tokens, wanted 8: {out}")
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
        generation, ranks, _ = until(f"a world of {p.s.workers}", lambda: _world_of(p, p.s.workers),
                                     p.s.step_timeout_s)
        p.run.say(f"world generation {generation}: {ranks} ranks")
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


def _world_of(p: Project, ranks: int, after: int = 0) -> tuple[int, int, set[int]] | None:
    generation, size, holders = p.world()
    return (generation, size, holders) if size == ranks and generation > after else None


def scale_up(p: Project) -> int:
    """One more worker joins a newer world, holds experts, serves; the generation it formed."""
    n = p.s.workers + 1
    before, _, _ = p.world()
    with p.run.step(f"--scale worker={n}: the new worker joins"):
        p.up(n)
        generation, _, holders = until(f"a world of {n} after generation {before}",
                                       lambda: _world_of(p, n, before), p.s.step_timeout_s)
        if n - 1 not in holders:
            raise ComposeTestError(f"rank {n - 1} holds no expert in generation {generation} ({holders})")
        until("gateway SERVING", p.serving, p.s.step_timeout_s)
        p.run.say(f"world generation {generation}: {n} ranks; rank {n - 1} holds experts; tokens {p.generate()}")
    return generation


def kill_and_rejoin(p: Project, generation: int) -> None:
    n = p.s.workers + 1
    victim = p.containers("worker")[1]
    with p.run.step(f"docker kill worker container {victim[:12]}: restarted, rejoins"):
        p.run.sh(["docker", "kill", victim], 60)

        def restarted() -> bool | None:
            state = json.loads(p.run.sh(["docker", "inspect", "-f", "{{json .}}", victim], 60))
            return True if state["RestartCount"] >= 1 and state["State"]["Running"] else None

        until("the killed container restarted", restarted, p.s.step_timeout_s)
        newer, _, _ = until(f"a world of {n} after generation {generation}", lambda: _world_of(p, n, generation),
                            p.s.step_timeout_s)
        until("gateway SERVING", p.serving, p.s.step_timeout_s)
        p.run.say(f"world generation {newer}: {n} ranks again; tokens {p.generate()}")


def down(p: Project) -> None:
    with p.run.step("down -v: no container, network or volume left"):
        p.compose("down", "-v", "--remove-orphans", "-t", "10", timeout_s=300)
        left = p.leftovers()
        if left:
            raise ComposeTestError(f"left behind by `down -v`: {left}")


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(ComposeTestSettings, argv, __doc__.splitlines()[0])
    run = Run()
    model_root = Path(tempfile.mkdtemp(prefix="moemesh-ct-model-"))
    model_root.chmod(0o755)
    model = model_root / "tiny"
    try:
        prepare(run, s, model)
        p = Project(run, s, model)
        run.say(f"project {p.name}, gateway gRPC published on {p.grpc}")
        try:
            serve_and_bench(p)
            kill_and_rejoin(p, scale_up(p))
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
