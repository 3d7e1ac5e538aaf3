"""`moemesh worker`: one expert worker process (one per device). Flags fall back to
MOEMESH_WORKER_* environment variables, read here once into WorkerSettings."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from expert_worker.server import WorkerSettings

ENV_PREFIX = "MOEMESH_WORKER_"


def _env(env: Mapping[str, str], name: str, default):
    return env.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """'12GiB', '60GB', '1e9' -> bytes."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 12GiB, 60GB, 1e9)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return int(value)


def _add_compute_options(p: argparse.ArgumentParser, e: Callable[[str, object], object]) -> None:
    """How the worker computes its experts and what it tells the coordinator about them."""
    p.add_argument("--micro-batches", type=int, default=int(e("micro_batches", 1)), choices=(1, 2, 3, 4),
                   help="split each step so exchanges overlap compute (same on every worker)")
    p.add_argument("--dtype", default=e("dtype", "auto"), choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype (auto: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--overflow", default=e("overflow", "dropless"), choices=("dropless", "reroute", "drop"),
                   help="what happens to token copies beyond an expert's capacity")
    p.add_argument("--capacity-factor", type=float, default=float(e("capacity_factor", 1.2)),
                   help="expert capacity as a multiple of the average load (reroute/drop)")
    p.add_argument("--expert-memory", type=_size, default=_size(e("expert_memory", "0")),
                   help="memory for expert weights, e.g. 60GB or 12GiB, reported to the coordinator "
                        "(bounds placement; --expert-shards 0 splits experts to fit); 0 = unknown")


def add_worker_command(sub: argparse._SubParsersAction, env: Mapping[str, str] | None = None) -> Callable:
    env = os.environ if env is None else env
    p = sub.add_parser("worker", help="run one expert worker (one per device)")
    e = lambda name, default: _env(env, name, default)  # noqa: E731
    p.add_argument("--coordinator", default=e("coordinator", None), required=e("coordinator", None) is None,
                   help="coordinator HOST:PORT")
    p.add_argument("--host", default=e("host", "127.0.0.1"), help="address to bind")
    p.add_argument("--port", type=int, default=int(e("port", 0)), help="port to bind (0 = any free port)")
    p.add_argument("--advertise-host", default=e("advertise_host", None), help="address peers use (default --host)")
    p.add_argument("--port-file", type=Path, default=e("port_file", None), help="write the bound port here")
    p.add_argument("--device", default=e("device", "cpu"))
    p.add_argument("--node", default=e("node", "local"), help="node name (for topology-aware placement)")
    p.add_argument("--worker-id", default=e("worker_id", ""))
    p.add_argument("--threads", type=int, default=int(e("threads", 1)), help="torch threads of this process")
    p.add_argument("--max-seqs", type=int, default=int(e("max_seqs", 32)), help="sequences running at once")
    p.add_argument("--max-model-len", type=int, default=int(e("max_model_len", 2048)))
    p.add_argument("--max-new-tokens-limit", type=int, default=int(e("max_new_tokens_limit", 4096)))
    p.add_argument("--collective-timeout", type=float, default=float(e("collective_timeout", 60.0)))
    p.add_argument("--report-every-tokens", type=int, default=int(e("report_every_tokens", 100)))
    _add_compute_options(p, e)
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process exits")
    p.add_argument("--log-level", default=e("log_level", "INFO"))

    def run(args: argparse.Namespace) -> int:
        import uvloop

        from expert_worker.server import serve
        from moemesh.logs import setup_logging

        setup_logging("worker", args.log_level)
        settings = WorkerSettings(
            coordinator=args.coordinator, host=args.host, port=args.port,
            advertise_host=args.advertise_host or args.host, port_file=args.port_file, device=args.device,
            node=args.node, worker_id=args.worker_id, threads=args.threads, max_seqs=args.max_seqs,
            max_model_len=args.max_model_len, max_new_tokens_limit=args.max_new_tokens_limit,
            collective_timeout_s=args.collective_timeout, report_every_tokens=args.report_every_tokens,
            exit_with_parent=args.exit_with_parent, micro_batches=args.micro_batches,
            dtype=args.dtype, overflow=args.overflow, capacity_factor=args.capacity_factor,
            expert_memory_bytes=args.expert_memory,
        )
        return uvloop.run(serve(settings))

    return run
