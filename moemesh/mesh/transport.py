"""Dispatch/Combine across ranks: one fixed-capacity all-to-all each way per MoE layer.

Shape legend: T tokens on this rank, K top-k, E experts per layer, R ranks, C rows reserved per
(source, destination) pair this step, D hidden, W = D + 1 payload width, N copies received.

Wire format of one all-to-all: a (R * C, W) buffer; block r (rows [r*C, (r+1)*C)) goes to rank r.
Each row is a token's hidden state plus, in its last column, the global expert id it is for
(-1 = padding), written through an integer view of the same width (int32 under fp32, int16 under
fp16/bf16) so the id is exact in any dtype. Folding the counts into the payload means one collective per direction instead
of a count exchange followed by a payload exchange: on loopback gloo the latency of a
collective, not its bytes, dominates a decode step.

C is the same on every rank because it comes from the step header every rank already gathered:
C = T_max * min(K, most experts any rank holds in the layer) bounds the copies one rank can send
to another. The collective itself lives behind `Collective`, so gloo and NCCL share this code.

Expert tensor parallelism: an expert split over a group of S ranks receives every one of its
token copies on all S ranks (P' >= T*K' pieces sent); each returns a partial output and combine
sums them in shard order. A rank still receives at most one piece per (token, expert), so C holds
when "experts a rank holds" counts shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moemesh.mesh.placement import Placement
from moemesh.model.moe import ExpertBatch, Pending, Routing


class Collective(Protocol):
    rank: int
    world_size: int

    def all_to_all(self, send: torch.Tensor) -> Pending[torch.Tensor]:
        """Start the exchange of send: (R * C, W), block r for rank r; the result is
        (R * C, W), block r from rank r. Ranks must start exchanges in the same order."""
        ...


@dataclass(frozen=True)
class LayerRoutes:
    """One layer's routing table for this rank, derived from the placement.

    An expert's replicas are rank groups (`Placement.groups`): a full replica is a group of one,
    an expert split for tensor parallelism a group of S ranks, rank s holding shard s.
    """

    groups: torch.Tensor  # (E, P, S) int64 rank holding shard s of replica group p, -1 = padding
    num_groups: torch.Tensor  # (E,) int64 replica groups of each expert
    group_size: torch.Tensor  # (E, P) int64 shards in each group (1 = a full replica), 0 = padding
    own_group: torch.Tensor  # (E,) int64 the group this rank is part of, -1 = none
    local_index: torch.Tensor  # (E,) int64 index among this rank's experts, -1 = not held here
    max_local: int  # most experts (whole or shard) any one rank holds in this layer
    num_local: int  # experts this rank holds in this layer
    max_shards: int  # largest group: 1 when no expert of the layer is split


_ID_DTYPE = {4: torch.int32, 2: torch.int16}


def id_view(payload: torch.Tensor) -> torch.Tensor:
    """The payload's bytes as integers of the same width (for the expert-id column)."""
    return payload.view(_ID_DTYPE[payload.element_size()])


def layer_routes(placement: Placement, layer: int, rank: int, device: torch.device | str = "cpu") -> LayerRoutes:
    """Built once per placement (on the host), then kept on the device the tokens are on."""
    E = len(placement.layers[layer])
    per_expert = [placement.groups(layer, e) for e in range(E)]
    P = max(len(g) for g in per_expert)
    S = max(len(group) for g in per_expert for group in g)
    groups = torch.full((E, P, S), -1, dtype=torch.int64)  # (E, P, S)
    size = torch.zeros(E, P, dtype=torch.int64)  # (E, P)
    own = torch.full((E,), -1, dtype=torch.int64)  # (E,)
    for e, expert_groups in enumerate(per_expert):
        for p, group in enumerate(expert_groups):
            groups[e, p, : len(group)] = torch.tensor(group)
            size[e, p] = len(group)
            if rank in group:
                own[e] = p
    local = torch.full((E,), -1, dtype=torch.int64)  # (E,)
    mine = placement.experts_on(rank, layer)
    for i, e in enumerate(mine):
        local[e] = i
    num_groups = torch.tensor([len(g) for g in per_expert], dtype=torch.int64)  # (E,)
    return LayerRoutes(
        groups=groups.to(device), num_groups=num_groups.to(device), group_size=size.to(device),
        own_group=own.to(device), local_index=local.to(device), max_local=max(placement.experts_per_rank(layer)),
        num_local=len(mine), max_shards=S,
    )


@dataclass(frozen=True)
class LoadSample:
    """Load statistics of one rank over a window of routed tokens."""

    expert_counts: torch.Tensor  # (L_moe, E) int64 token copies per (MoE layer, expert)
    link_counts: torch.Tensor  # (L_moe, R) int64 token copies sent to each destination rank
    tokens: int  # tokens routed in the window


@dataclass(frozen=True)
class _Sent:
    """Where this rank's token copies went, for putting their results back together."""

    kept: torch.Tensor  # (T*K',) the copies that travelled (not dropped by the router)
    copy: torch.Tensor  # (P',) index into kept of each piece sent (a copy fans out to S shards)
    slot: torch.Tensor  # (P',) shard index of each piece: 0 for a full replica
    send_rows: torch.Tensor  # (P',) row of the send buffer holding each piece
    max_shards: int  # S: 1 when no expert of the layer is split


@dataclass(frozen=True)
class _Handle:
    sent: _Sent
    recv_rows: torch.Tensor  # (N,) rows of the receive buffer, in ExpertBatch order
    shape: tuple[int, int, int]  # (T, K, total rows R*C)


class _Then:
    """A pending exchange followed by local post-processing of its result."""

    def __init__(self, pending: Pending, then):
        self.pending, self.then = pending, then

    def wait(self):
        return self.then(self.pending.wait())


def _per_copy(returned: torch.Tensor, sent: _Sent, T: int, K: int, D: int) -> torch.Tensor:
    """returned: (R*C, D) -> (T, K, D) outputs per token copy; zeros for dropped copies.
    A split expert's shard outputs are summed in shard order (deterministic on any device)."""
    pieces = returned[sent.send_rows]  # gather (P', D)
    if sent.max_shards > 1:
        parts = torch.zeros(sent.kept.numel(), sent.max_shards, D, dtype=returned.dtype,
                            device=returned.device)  # (T*K', S, D)
        parts[sent.copy, sent.slot] = pieces  # scatter each shard's partial output to its slot
        pieces = parts.sum(dim=1, dtype=torch.float32).to(returned.dtype)  # (T*K', D) one rounding in 16-bit
    if sent.kept.numel() == T * K:
        return pieces.view(T, K, D)  # nothing was dropped
    out = torch.zeros(T * K, D, dtype=returned.dtype, device=returned.device)
    out[sent.kept] = pieces  # scatter to copy order
    return out.view(T, K, D)


class AllToAllTransport:
    """Transport over a Collective. Every rank calls dispatch/combine for every MoE layer of
    every step, in the same order, with the same `begin_step` T_max (cross-rank invariant)."""

    def __init__(self, collective: Collective, placement: Placement, device: str | torch.device = "cpu"):
        self.collective = collective
        self.device = torch.device(device)  # where tokens, routing tables and counters live
        self.rank = collective.rank
        self.world_size = collective.world_size
        self.max_tokens: tuple[int, ...] = (0,)  # per micro-batch
        self.set_placement(placement)
        self.counted_tokens = 0  # tokens routed since the last take_counts()

    def set_placement(self, placement: Placement) -> None:
        assert placement.world_size == self.world_size, "placement is for another world"
        self.placement = placement
        self.routes = {layer: layer_routes(placement, layer, self.rank, self.device) for layer in placement.layers}
        self.layer_order = sorted(placement.layers)
        self._row = {layer: i for i, layer in enumerate(self.layer_order)}  # MoE layer -> statistics row
        E = len(next(iter(placement.layers.values())))
        self._counts = torch.zeros(len(self.layer_order), E, dtype=torch.int64, device=self.device)  # (L_moe, E)
        self._links = torch.zeros(len(self.layer_order), self.world_size, dtype=torch.int64,
                                  device=self.device)  # (L_moe, R)

    def take_counts(self) -> LoadSample:
        """What this rank routed since the last call (rows follow `layer_order`); resets it."""
        sample = LoadSample(self._counts.cpu(), self._links.cpu(), self.counted_tokens)
        self._counts = torch.zeros_like(self._counts)
        self._links = torch.zeros_like(self._links)
        self.counted_tokens = 0
        return sample

    def begin_step(self, max_tokens: tuple[int, ...]) -> None:
        """T_max per micro-batch: the most tokens any rank runs in it this step (from the
        gathered step header, so every rank sizes its buffers the same)."""
        self.max_tokens = tuple(max_tokens)

    def capacity(self, layer: int, top_k: int, micro: int = 0) -> int:
        return self.max_tokens[micro] * min(top_k, self.routes[layer].max_local)

    def dispatch(self, layer: int, x: torch.Tensor, routing: Routing, micro: int = 0) -> Pending[tuple[ExpertBatch, Any]]:
        routes = self.routes[layer]
        T, K = routing.expert_ids.shape
        R, D = self.world_size, x.shape[1]
        C = self.capacity(layer, K, micro)
        self._count(layer, routing.expert_ids)
        flat_e = routing.expert_ids.reshape(-1)  # (T*K,) -1 = dropped by the router
        kept = torch.nonzero(flat_e >= 0).squeeze(1)  # (T*K',) copies that travel
        expert = flat_e[kept]  # (T*K',)
        copy, slot, dest = self._destinations(routes, expert, kept // K)  # (P',) each
        self._links[self._row[layer]] += torch.bincount(dest, minlength=R)  # (R,) pieces per destination
        send_rows = self._send_rows(dest, C)  # (P',)
        send = torch.zeros(R * C, D + 1, dtype=x.dtype, device=x.device)  # (R*C, W)
        ids = id_view(send)  # (R*C, W) same bytes, integer dtype
        ids[:, D] = -1
        send[send_rows, :D] = x[kept[copy] // K]  # gather + scatter (P', D)
        ids[send_rows, D] = expert[copy].to(ids.dtype)
        sent = _Sent(kept, copy, slot, send_rows, routes.max_shards)
        return _Then(self.collective.all_to_all(send), lambda recv: self._received(routes, recv, sent, T, K))

    def _received(self, routes: LayerRoutes, recv: torch.Tensor, sent: _Sent, T: int, K: int):
        """recv: (R*C, W) -> the ExpertBatch for this rank's experts and the combine handle."""
        D = recv.shape[1] - 1
        expert = id_view(recv)[:, D].to(torch.int64)  # (R*C,) -1 = padding
        valid = torch.nonzero(expert >= 0).squeeze(1)  # (N,)
        local = routes.local_index[expert[valid]]  # (N,)
        assert bool((local >= 0).all()), "received a token for an expert this rank does not hold"
        order = torch.argsort(local, stable=True)  # (N,) group by local expert
        recv_rows = valid[order]  # (N,)
        counts = torch.bincount(local, minlength=routes.num_local).tolist()
        batch = ExpertBatch(x=recv[recv_rows, :D], counts=counts)  # gather (N, D)
        return batch, _Handle(sent, recv_rows, (T, K, recv.shape[0]))

    def combine(self, layer: int, y: torch.Tensor, handle: Any) -> Pending[torch.Tensor]:
        T, K, rows = handle.shape
        D = y.shape[1]
        back = torch.zeros(rows, D, dtype=y.dtype, device=y.device)  # (R*C, D)
        back[handle.recv_rows] = y  # scatter to the rows the copies arrived in
        return _Then(self.collective.all_to_all(back), lambda returned: _per_copy(returned, handle.sent, T, K, D))

    def _count(self, layer: int, expert_ids: torch.Tensor) -> None:
        row = self._row[layer]
        flat = expert_ids.reshape(-1)  # (T*K,) -1 = dropped
        self._counts[row] += torch.bincount(flat[flat >= 0], minlength=self._counts.shape[1])
        if row == 0:
            self.counted_tokens += expert_ids.shape[0]

    def _destinations(self, routes: LayerRoutes, expert: torch.Tensor, token: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """expert: (C',) expert of each copy, token: (C',) its token -> per piece sent (P',):
        the copy it belongs to, its shard slot and its destination rank.

        A copy goes to the replica group this rank is part of (no traffic for a full replica
        here), else to group token mod P (spreads a hot expert's tokens), and to every rank
        of that group: P' = C' unless some expert is split.
        """
        own = routes.own_group[expert]  # (C',)
        group = torch.where(own >= 0, own, token % routes.num_groups[expert])  # (C',)
        if routes.max_shards == 1:
            copy = torch.arange(expert.numel(), device=expert.device)  # (C',)
            return copy, torch.zeros_like(copy), routes.groups[expert, group, 0]  # gather (C',)
        size = routes.group_size[expert, group]  # (C',) shards of the chosen group
        copy = torch.repeat_interleave(torch.arange(expert.numel(), device=expert.device), size)  # (P',)
        slot = torch.arange(copy.numel(), device=expert.device) - (torch.cumsum(size, 0) - size)[copy]  # (P',)
        return copy, slot, routes.groups[expert[copy], group[copy], slot]  # gather (P',)

    @staticmethod
    def _send_rows(dest: torch.Tensor, capacity: int) -> torch.Tensor:
        """dest: (P',) -> the send-buffer row of each piece: block dest, next free row in it."""
        order = torch.argsort(dest, stable=True)  # (P',)
        sorted_dest = dest[order]  # (P',)
        counts = torch.bincount(sorted_dest, minlength=1)  # copies per destination
        starts = torch.cumsum(counts, 0) - counts  # (R',) first sorted index of each destination
        within = torch.arange(dest.numel(), device=dest.device) - starts[sorted_dest]  # (P',)
        assert dest.numel() == 0 or int(within.max()) < capacity, "capacity overflow"
        rows = torch.empty_like(dest)
        rows[order] = sorted_dest * capacity + within  # scatter back to copy order
        return rows
