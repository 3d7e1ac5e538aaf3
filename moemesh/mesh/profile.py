"""Where a mesh rank's decode step goes: `workers` processes joined by gloo, each running the
lockstep step (schedule, step header, execute) on its own batch with nothing else in the process
(no gRPC, no request table), rank 0 profiled (moemesh.engine.profile). A served worker's step
minus this bare one is what serving costs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moemesh.engine.engine import Engine
from moemesh.engine.profile import StepSplit, decode_split
from moemesh.engine.sampling import SamplingParams
from moemesh.mesh.gloo import init_gloo
from moemesh.mesh.lockstep import exchange_header
from moemesh.mesh.placement import initial_placement
from moemesh.mesh.transport import AllToAllTransport
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model

RESULT_TIMEOUT_S = 600.0  # bounds a hang only


def profile_mesh(model: Path, prompts: list[list[int]], workers: int, steps: int = 12) -> StepSplit:
    """`workers` processes (one torch thread each) joined by gloo, each running the lockstep step
    (schedule, step header, execute) on `prompts` without any serving; rank 0's split."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = ctx.Queue()
    procs = [ctx.Process(target=_profile_rank, args=(r, workers, store.port, model, prompts, steps, out), daemon=True)
             for r in range(workers)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=RESULT_TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return results[0]


def _profile_rank(rank: int, workers: int, port: int, model: Path, prompts: list[list[int]], steps: int,
                  out: Any) -> None:
    """One rank of `profile_mesh`: its split (or what broke) goes to `out` as (rank, result)."""
    torch.set_num_threads(1)
    try:
        collective = init_gloo("127.0.0.1", port, "profile/", rank, workers, 120.0)
        cfg = load_config(model)
        placement = initial_placement(cfg.num_experts, cfg.moe_layer_ids, workers)
        transport = AllToAllTransport(collective, placement)
        runtime = RuntimeShape(max_seqs=len(prompts), max_model_len=max(map(len, prompts)) + 2 * steps + 8)
        engine = Engine(build_model(model, runtime, transport=transport, assignment=placement.assignment(rank)))

        def step() -> None:
            batch = engine.schedule()
            header = exchange_header(collective, batch.tokens_per_micro, placement.epoch, False)
            engine.execute(batch, header.max_tokens)

        params = SamplingParams(max_new_tokens=2 * steps + 6, ignore_eos=True)
        out.put((rank, decode_split(engine, prompts, params, steps, step, collective)))
        collective.close()
    except BaseException as exc:  # reported to the parent, which raises it
        out.put((rank, exc))
