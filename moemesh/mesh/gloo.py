"""The CPU data plane: torch.distributed's gloo backend (an existing collective engine).

One process group per world generation, rendezvous through the coordinator's TCPStore.
Uneven splits are never needed: the transport pads every (source, destination) block to the
step's capacity, so `all_to_all_single` runs with equal splits.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moemesh.model.moe import Done, Pending


class _GlooPending:
    def __init__(self, owner: GlooCollective, work, result: torch.Tensor):
        self.owner, self.work, self.result = owner, work, result

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        self.work.wait()
        self.owner.seconds += time.perf_counter() - start
        return self.result


class GlooCollective:
    """Collectives of one world; all ranks call them in the same order (cross-rank invariant)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.seconds = 0.0  # wall time blocked on collectives (waiting for peers included)

    def all_to_all(self, send: torch.Tensor) -> Pending[torch.Tensor]:
        """Start send: (R * C, W) -> (R * C, W): block r goes to rank r, block r comes from rank r.
        Runs on gloo's own threads; only the time blocked in wait() counts as exposed."""
        if self.world_size == 1:
            return Done(send)
        recv = torch.empty_like(send)
        return _GlooPending(self, dist.all_to_all_single(recv, send, async_op=True), recv)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) int64 -> (R, n): every rank's values, by rank."""
        if self.world_size == 1:
            return values.unsqueeze(0)
        start = time.perf_counter()
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(out, values)
        self.seconds += time.perf_counter() - start
        return torch.stack(out)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class StoreWaker:
    """Idle ranks sleep in a blocking store wait instead of polling with collectives.

    Idle round n (every rank counts the same idle headers, so n agrees) ends when any rank sets
    key n: it has a request, a loaded epoch, or wants to stop. Costs no CPU while idle.
    """

    def __init__(self, host: str, port: int, prefix: str, timeout_s: float):
        self._timeout = timeout_s
        # Two clients: the engine thread blocks in wait() while the server thread calls wake().
        self._waiting = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False))
        self._waking = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False))

    def wait(self, round_: int) -> None:
        try:
            self._waiting.wait([str(round_)], timedelta(seconds=self._timeout))
        except dist.DistStoreError:
            pass  # nothing happened for a long while: look again

    def wake(self, round_: int) -> None:
        self._waking.set(str(round_), "1")


def init_gloo(
    store_host: str, store_port: int, prefix: str, rank: int, world_size: int, timeout_s: float
) -> GlooCollective:
    """Join the world: blocks until all `world_size` ranks have joined (or `timeout_s` passes)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size, timeout=timeout
    )
    return GlooCollective(rank, world_size)
