"""The chaos test (issue 11): `moemesh up --workers 4` with redundant experts serves a closed-loop
load of greedy and seeded requests while a killer SIGKILLs random workers and `up` restarts them.
No request may fail and every output must equal `moemesh generate --local`'s, token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moemesh.chaos import Killer, make_requests, reference, run_load, worker_processes
from moemesh.client import Client
from moemesh.launcher import UpProcess
from moemesh.model.tiny import TinySpec, write_tiny_model

pytestmark = pytest.mark.slow  # a 4-worker mesh, killed and healed twice

SPEC = TinySpec(layers=2, experts=8, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=300)
KILLS = 2
MAX_ROUNDS = 8  # the load repeats its requests until the killer is done (bounded)
HANG_S = 240.0  # bounds a hang only: one request's deadline


def _round(gateway: str, requests) -> list:
    outcomes, _ = asyncio.run(run_load(gateway, requests, concurrency=6, timeout_s=HANG_S))
    return outcomes


async def _generation(gateway: str) -> int:
    async with Client(gateway) as client:
        return (await client.model_info()).world_generation


def test_killing_random_workers_under_load_fails_no_request_and_changes_no_token(tmp_path: Path):
    model = write_tiny_model(tmp_path / "model", SPEC)
    requests = make_requests(12, SPEC.vocab, max_new_tokens=24, seed=1)
    expected = reference(model, requests, max_model_len=256)
    up = UpProcess(model, workers=4, extra=["--redundant-experts", "1", "--max-restarts", str(KILLS)], quiet=True)
    rounds: list[list] = []
    try:
        killer = Killer(lambda: worker_processes(up.proc.pid), interval_s=3.0, kills=KILLS, seed=3).start()
        while (len(killer.killed) < KILLS or not rounds) and len(rounds) < MAX_ROUNDS:
            rounds.append(_round(up.gateway, requests))
        killer.stop()
        rounds.append(_round(up.gateway, requests))  # and after the last recovery
        generation = asyncio.run(_generation(up.gateway))
    finally:
        leftover = up.stop()
    assert len(killer.killed) == KILLS, f"the load ended before {KILLS} kills ({len(rounds)} rounds)"
    for outcomes in rounds:
        assert [o.error for o in outcomes] == [""] * len(requests)
        assert [o.tokens for o in outcomes] == expected
    assert generation >= 1 + KILLS  # each loss formed a new world (and each restarted worker joined one)
    assert leftover == []
