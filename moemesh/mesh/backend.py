"""Choosing and joining the data plane: "gloo" on CPU, "nccl" (CuPy) on CUDA devices.

`choose_backend` is pure policy: it returns the backend and the reason, which the worker logs,
so a deployment that silently fell back to gloo is visible. `join_world` does the rendezvous:
both backends meet at the coordinator's TCPStore (NCCL's unique id is made by rank 0 and
shared through it: the CPU-only coordinator has no NCCL).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from moemesh.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "gloo" or "nccl"
    reason: str


def nccl_unavailable_reason(device: str) -> str | None:
    """None when NCCL through CuPy can run on `device`; else why not."""
    if not device.startswith("cuda"):
        return f"device is {device!r}, not CUDA"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        import cupy
        import cupy.cuda.nccl
    except ImportError as exc:
        return f"CuPy with NCCL is not installed ({exc}); install the `gpu` extra"
    if not cupy.is_available():
        return "CuPy is installed but finds no usable GPU"
    return None


def choose_backend(requested: str, device: str) -> BackendChoice:
    if requested not in BACKENDS:
        raise ConfigError(f"transport {requested!r} unknown; choose one of {', '.join(BACKENDS)}")
    if requested == "gloo":
        return BackendChoice("gloo", "requested")
    why_not = nccl_unavailable_reason(device)
    if requested == "nccl":
        if why_not:
            raise ConfigError(f"transport nccl requested but unavailable: {why_not}")
        return BackendChoice("nccl", "requested")
    if why_not:
        return BackendChoice("gloo", f"auto: falling back to gloo because {why_not}")
    return BackendChoice("nccl", f"auto: CUDA device {device} with CuPy NCCL")


def join_world(choice: BackendChoice, host: str, port: int, prefix: str, rank: int, world_size: int,
               device: str, timeout_s: float, micro_batches: int = 1, abandoned: Callable[[], bool] = lambda: False,
               bind_host: str | None = None):
    """Blocks until every rank has joined; returns the Collective. `micro_batches` per step sizes
    NCCL's ring of receive buffers (2 per micro-batch; see moemesh.mesh.nccl.RecvRing).
    `timeout_s` bounds the rendezvous and, for both backends, every collective afterwards (NCCL:
    a wait past it aborts the communicator and raises CollectiveError). `abandoned()` turns true
    once a newer world generation exists: a collective that has waited a while then gives up
    (CollectiveError) instead of waiting for peers that already left. `bind_host`: the interface
    gloo listens on (NCCL picks its own: NCCL_SOCKET_IFNAME)."""
    if choice.name == "gloo":
        from moemesh.mesh.gloo import init_gloo

        return init_gloo(host, port, prefix, rank, world_size, timeout_s, abandoned, bind_host)
    import torch.distributed as dist

    from moemesh.mesh.nccl import NcclCollective, make_unique_id

    store = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s)))
    if rank == 0:
        store.set("nccl_unique_id", json.dumps(make_unique_id()))
    unique_id = tuple(json.loads(store.get("nccl_unique_id")))
    return NcclCollective(rank, world_size, unique_id, torch.device(device), in_flight=2 * micro_batches,
                          timeout_s=timeout_s, abandoned=abandoned)
