"""The one task that forms every world after the first: wait for a change, settle, probe, form.

Pure asyncio (no gRPC): the probe is handed in (coordinator/probe.py asks a worker's
grpc.health.v1 service). Re-formation is serialized in this task; events that arrive while it
settles, probes or forms set `state.changed` again and are folded into the next generation, so
a burst (three joiners, a crash noticed by every peer) becomes one generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from coordinator.membership import WorkerInfo
from coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

Probe = Callable[[WorkerInfo], Awaitable[bool]]  # True when the worker answered (alive)

PROBE_FAILED = "did not answer a health probe"
RETRY_AFTER_S = 1.0  # after a failed round, the next one starts this much later


async def reform_worlds(state: CoordinatorState, probe: Probe, settle_s: float) -> None:
    """Run until cancelled: each time `state.changed` is set, wait `settle_s` for more events,
    probe the suspects concurrently, evict the dead, and form the next generation if due."""
    while True:
        await state.changed.wait()
        await asyncio.sleep(settle_s)
        state.changed.clear()
        try:
            await _round(state, probe)
        except Exception:  # a bug here must not end re-formation for good, nor leave a broken world waiting
            log.exception("forming the next world failed; trying again in %.1f s", RETRY_AFTER_S)
            await asyncio.sleep(RETRY_AFTER_S)
            state.changed.set()


async def _round(state: CoordinatorState, probe: Probe) -> None:
    suspects = state.take_suspects()
    if suspects:
        answers = await asyncio.gather(*(probe(w) for w in suspects), return_exceptions=True)
        for worker, answer in zip(suspects, answers):
            if isinstance(answer, BaseException):  # a bug in probing is not a verdict: keep the member
                log.error("probing %s failed: %r; it is kept", worker.worker_id, answer)
        alive = [answer is not False for answer in answers]
        verdicts = (f"{w.worker_id}: {'alive' if ok else 'dead'}" for w, ok in zip(suspects, alive))
        log.info("probed %s", ", ".join(verdicts))
        for worker, ok in zip(suspects, alive):
            if not ok:
                state.evict(worker, PROBE_FAILED)
    state.form_next_world()
