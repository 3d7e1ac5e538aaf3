"""`moemesh compose-gpu --gpus G`: compose/gpu.yaml, one worker service per GPU of a node.

Compose cannot give each `--scale` replica its own GPU, so a GPU node runs one service per GPU,
`worker-gpu<i>`, pinned with `device_ids: ["<i>"]` and `capabilities: [gpu]`. Each is derived from
compose/compose.yaml's `worker` service (one definition of a worker: command, settings, healthcheck),
plus its device; the override sets the CPU `worker` to `scale: 0`, the first world to G workers and
the data plane to NCCL where it can (`--transport auto`):

    docker-compose -f compose/compose.yaml -f compose/gpu.yaml up -d

`lint` checks what the compose-spec schema cannot: a device request giving `count` together with
`device_ids` (Docker refuses that), a GPU given to two services, a GPU request without `gpu` in
its capabilities. `override` and `lint` are pure: data in, data out.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from moemesh.errors import ConfigError
from moemesh.settings import add_options, option, parse_bool, settings_from

REPO = Path(__file__).resolve().parents[1]
BASE_SERVICE = "worker"


@dataclass(frozen=True)
class ComposeGpuSettings:
    """`moemesh compose-gpu`: flags only (a generated file says how it was made in its header)."""

    ENV_PREFIX: ClassVar[str | None] = None

    gpus: int = option("--gpus", "GPUs on this node: one worker service each", int, default=0)
    first_gpu: int = option("--first-gpu", "device id of the first GPU to use", int, default=0)
    base: Path = option("--base", "the CPU compose file whose worker service each GPU worker copies", Path,
                        default=REPO / "compose" / "compose.yaml")
    out: Path | None = option("--out", "write here (default: print)", Path, default=None)
    lint_only: bool = option("--lint", "only lint --base merged with --out (no writing)", parse_bool, default=False)

    def __post_init__(self) -> None:
        if not self.lint_only and self.gpus < 1:
            raise ConfigError(f"--gpus must be at least 1, got {self.gpus}")
        if self.first_gpu < 0:
            raise ConfigError(f"--first-gpu must be >= 0, got {self.first_gpu}")


def override(base: dict[str, Any], device_ids: list[str]) -> dict[str, Any]:
    """The gpu.yaml document for `device_ids`, derived from `base`'s worker service."""
    # Step 1: one service per GPU, a copy of the CPU worker plus its device.
    worker = base["services"][BASE_SERVICE]
    services: dict[str, Any] = {f"worker-gpu{d}": _gpu_worker(worker, d) for d in device_ids}
    # Step 2: the CPU worker runs no replica; the first world waits for every GPU worker.
    services[BASE_SERVICE] = {"scale": 0}
    services["coordinator"] = {"environment": {"MOEMESH_COORDINATOR_WORKERS": str(len(device_ids)),
                                               "MOEMESH_COORDINATOR_TRANSPORT": "auto"}}
    # Step 3: the gateway starts once every GPU worker is healthy.
    services["gateway"] = {"depends_on": {name: {"condition": "service_healthy"} for name in services
                                          if name.startswith("worker-gpu")}}
    return {"services": services}


def _gpu_worker(worker: dict[str, Any], device_id: str) -> dict[str, Any]:
    service = {k: copy.deepcopy(v) for k, v in worker.items() if k not in ("build", "scale", "deploy")}
    service["environment"] = {**service.get("environment", {}), "MOEMESH_WORKER_DEVICE": "cuda:0"}
    service["deploy"] = {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "device_ids": [device_id], "capabilities": ["gpu"]}]}}}
    return service


def lint(doc: dict[str, Any]) -> list[str]:
    """What a compose file's device requests get wrong that the schema does not see; [] when fine."""
    problems, owner = [], {}
    for name, device in _device_requests(doc):
        ids = [str(i) for i in device.get("device_ids", [])]
        if "count" in device and ids:
            problems.append(f"{name}: a device request gives both count and device_ids (Docker takes one)")
        if device.get("driver") == "nvidia" and "gpu" not in device.get("capabilities", []):
            problems.append(f"{name}: an nvidia device request without capabilities [gpu]")
        for i in ids:
            if i not in owner:
                owner[i] = name
            elif owner[i] == name:
                problems.append(f"{name}: device id {i} listed twice")
            else:
                problems.append(f"{name}: device id {i} is already {owner[i]}'s")
    return problems


def _device_requests(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in (doc.get("services") or {}).items():
        reservations = ((service or {}).get("deploy") or {}).get("resources", {}).get("reservations", {})
        for device in reservations.get("devices") or []:
            yield name, device


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base` the way compose merges services (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for name, service in (over.get("services") or {}).items():
        out.setdefault("services", {})[name] = _merge(out.get("services", {}).get(name, {}), service)
    return out


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return copy.deepcopy(b)


def render(doc: dict[str, Any], gpus: int, first_gpu: int) -> str:
    head = (f"# Generated by `moemesh compose-gpu --gpus {gpus}"
            f"{f' --first-gpu {first_gpu}' if first_gpu else ''}` from compose/compose.yaml's worker service;\n"
            "# regenerate rather than edit. One worker service per GPU (compose cannot give each --scale\n"
            "# replica its own GPU):  docker-compose -f compose/compose.yaml -f compose/gpu.yaml up -d\n")
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a compose file (a mapping)")
    return doc


def _run(s: ComposeGpuSettings) -> int:
    base = load(s.base)
    if s.lint_only:
        if s.out is None:
            raise ConfigError("--lint needs --out FILE (the override to check)")
        over = load(s.out)
    else:
        over = override(base, [str(s.first_gpu + i) for i in range(s.gpus)])
    problems = lint(merged(base, over))
    for line in problems:
        print(f"moemesh compose-gpu: {line}", file=sys.stderr)
    if problems or s.lint_only:
        return 1 if problems else 0
    text = render(over, s.gpus, s.first_gpu)
    if s.out is None:
        print(text, end="")
    else:
        s.out.write_text(text)
        print(f"wrote {s.out}: {s.gpus} GPU worker services")
    return 0


def add_compose_gpu_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("compose-gpu", help="write compose/gpu.yaml: one worker service per GPU (or --lint one)")
    add_options(p, ComposeGpuSettings)

    def run(args: argparse.Namespace) -> int:
        return _run(settings_from(ComposeGpuSettings, args, {}))

    return run
