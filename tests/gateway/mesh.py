"""A real mesh for end-to-end tests: coordinator, N expert workers and a gateway as subprocesses.

Nothing is mocked: the mesh is started by the one launcher (moemesh.launch); each process binds
port 0 and publishes its port through a port file, logs to logs/NAME.log; `running_mesh` yields once
the gateway reports SERVING and always stops every process it started (gateway first, then
workers, then the coordinator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from moemesh.launch import Mesh, MeshSpec, running
from moemesh.model.tiny import TinySpec, write_tiny_model

TINY = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512)
START_TIMEOUT_S = 120.0
QUIET_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def running_mesh(
    tmp: Path, *, workers: int = 2, gateway_flags: Sequence[str] = (), worker_flags: Sequence[str] = (),
    spec: TinySpec = TINY,
) -> Iterator[Mesh]:
    """Start coordinator, gateway and `workers` workers; yield when the gateway is SERVING.
    The gateway starts before any worker: it must wait for the world by itself."""
    tmp.mkdir(parents=True, exist_ok=True)
    model_dir = tmp / "model"
    if not (model_dir / "config.json").exists():
        write_tiny_model(model_dir, spec)
    mesh = MeshSpec(model=model_dir, workers=workers, state_dir=tmp, log_dir=tmp / "logs", gateway_first=True,
                    worker_flags=("--threads", "1", "--max-seqs", "8", *worker_flags),
                    gateway_flags=tuple(gateway_flags), env=QUIET_ENV, start_timeout_s=START_TIMEOUT_S)
    with running(mesh) as m:
        yield m
