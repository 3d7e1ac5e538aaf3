"""Dispatch/Combine across ranks: one fixed-capacity all-to-all each way per MoE layer.

Shape legend: T tokens on this rank, K top-k, E experts per layer, R ranks, C rows reserved per
(source, destination) pair this step, D hidden, W = D + 1 payload width, N copies received.

Wire format of one all-to-all: a (R * C, W) buffer; block r (rows [r*C, (r+1)*C)) goes to rank r.
Each row is a token's hidden state plus, in its last column, the global expert id it is for
(-1 = padding), written through an integer view of the same width (int32 under fp32, int16 under
fp16/bf16) so the id is exact in any dtype. Folding the counts into the payload means one
collective per direction instead of a count exchange followed by a payload exchange: on loopback gloo the latency of a
collective, not its bytes, dominates a decode step.

C is the same on every rank because T_max comes from the step header every rank already
gathered, passed down the forward pass as an argument (`dispatch(..., t_max)`):
C = T_max * min(K, most experts any rank holds in the layer) bounds the copies one rank can send
to another. The collective itself lives behind `Collective`, so gloo and NCCL share this code.

Host syncs: dispatch and combine count and place pieces with scatter/cumsum/argsort only (no
nonzero, boolean masks or bincount); the one host read-back per layer is the received counts
per local expert (ExpertBatch.counts, needed to launch the grouped matmuls), read together with
two device-side flags (capacity overflow, a token for an expert not held) asserted there.
Load statistics are not kept here: an optional `DestinationObserver` sees each layer's
destinations (moemesh.mesh.routing_counts.LoadRecorder).

Expert tensor parallelism: an expert split over a group of S ranks receives every one of its
token copies on all S ranks (P' >= T*K' pieces sent); each returns a partial output and combine
sums them in shard order. A rank still receives at most one piece per (token, expert), so C holds
when "experts a rank holds" counts shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from moemesh.mesh.placement import Placement
from moemesh.model.moe import ExpertBatch, Pending, Routing, group_by_expert

A = TypeVar("A")
B = TypeVar("B")


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


class DestinationObserver(Protocol):
    """Sees where each layer's pieces go (the load recorder's link counts, moemesh.mesh.routing_counts)."""

    def sent(self, layer: int, dest: torch.Tensor) -> None:
        """dest: (P,) int64 destination rank of each piece, -1 = not sent (dropped, padding)."""
        ...


@dataclass(frozen=True)
class AllToAllHandle:
    """Where this rank's pieces went and where the received ones came from, for combine.

    Pieces are laid out copy-major, shard-minor: piece (t*K + k)*S + s is shard s of token t's
    k-th copy; padding pieces (dropped copies, slots past a group's size) went nowhere.
    """

    send_rows: torch.Tensor  # (T*K*S,) row of the send buffer of each piece; R*C = went nowhere
    recv_rows: torch.Tensor  # (N,) rows of the receive buffer, in ExpertBatch order
    shape: tuple[int, int, int, int]  # (T, K, S, R*C)


class _Then(Generic[A, B]):
    """A pending exchange followed by local post-processing of its result."""

    def __init__(self, pending: Pending[A], then: Callable[[A], B]):
        self.pending, self.then = pending, then

    def wait(self) -> B:
        return self.then(self.pending.wait())


def destinations(routes: LayerRoutes, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids: (T, K), -1 = dropped -> per piece (T*K*S,): its expert and its destination
    rank (-1 = goes nowhere). No host sync.

    A copy goes to the replica group this rank is part of (no traffic for a full replica
    here), else to group token mod P (spreads a hot expert's tokens), and to every rank of
    that group: one piece per shard.
    """
    T, K = expert_ids.shape
    S = routes.max_shards
    flat = expert_ids.reshape(-1)  # (T*K,)
    expert = flat.clamp(min=0)  # (T*K,) dropped copies look up expert 0, then are masked
    token = torch.arange(T * K, device=flat.device) // K  # (T*K,)
    own = routes.own_group[expert]  # gather (T*K,)
    group = torch.where(own >= 0, own, token % routes.num_groups[expert])  # (T*K,)
    ranks = routes.groups[expert, group]  # gather (T*K, S), -1 = padding slot
    slot = torch.arange(S, device=flat.device)  # (S,)
    valid = (flat >= 0).unsqueeze(1) & (slot.unsqueeze(0) < routes.group_size[expert, group].unsqueeze(1))  # (T*K, S)
    dest = torch.where(valid, ranks, -1).reshape(-1)  # (T*K*S,)
    return torch.where(valid, flat.unsqueeze(1), -1).reshape(-1), dest  # (T*K*S,) each


def send_rows(dest: torch.Tensor, world_size: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dest: (P,) destination rank of each piece, -1 = none -> (rows, overflow): the send-buffer
    row of each piece (block dest, next free row in it; R*C = nowhere) and a device-side flag set
    when some block had more than `capacity` pieces. No host sync."""
    R, P = world_size, dest.numel()
    target = torch.where(dest >= 0, dest, R)  # (P,) R = the "nowhere" column
    onehot = torch.zeros(P, R + 1, dtype=torch.int64, device=dest.device)  # (P, R + 1)
    onehot.scatter_(1, target.unsqueeze(1), 1)  # scatter (P, R + 1)
    before = onehot.cumsum(0) - onehot  # (P, R + 1) earlier pieces to each destination
    within = before.gather(1, target.unsqueeze(1)).squeeze(1)  # gather (P,)
    fits = (dest >= 0) & (within < capacity)  # (P,)
    overflow = ((dest >= 0) & ~fits).any()  # () checked at the layer's one read-back
    return torch.where(fits, dest * capacity + within, R * capacity), overflow


def _per_copy(returned: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
    """returned: (R*C, D) -> (T, K, D) outputs per token copy; zeros for dropped copies.
    A split expert's shard outputs are summed in shard order (deterministic on any device)."""
    T, K, S, _ = handle.shape
    D = returned.shape[1]
    padded = torch.cat([returned, returned.new_zeros(1, D)])  # (R*C + 1, D): the last row = nothing
    pieces = padded[handle.send_rows]  # gather (T*K*S, D)
    if S > 1:
        pieces = pieces.view(T * K, S, D).sum(dim=1, dtype=torch.float32).to(returned.dtype)  # (T*K, D) one rounding
    return pieces.view(T, K, D)  # (T, K, D)


class AllToAllTransport:
    """Transport over a Collective. Every rank calls dispatch/combine for every MoE layer of
    every step, in the same order, with the same `t_max` per micro-batch (cross-rank invariant:
    it comes from the step header). One host read-back per layer: the received counts."""

    def __init__(self, collective: Collective, placement: Placement, device: str | torch.device = "cpu",
                 observer: DestinationObserver | None = None):
        self.collective = collective
        self.device = torch.device(device)  # where tokens and routing tables live
        self.rank = collective.rank
        self.world_size = collective.world_size
        self.observer = observer
        self.set_placement(placement)

    def rejoin(self, collective: Collective) -> None:
        """Move to a new world generation's collective; a placement for that world follows
        (set_placement) before the next dispatch."""
        self.collective = collective
        self.rank = collective.rank
        self.world_size = collective.world_size

    def set_placement(self, placement: Placement) -> None:
        assert placement.world_size == self.world_size, "placement is for another world"
        self.placement = placement
        self.routes = {layer: layer_routes(placement, layer, self.rank, self.device) for layer in placement.layers}

    def capacity(self, layer: int, top_k: int, t_max: int) -> int:
        """C: rows per (source, destination) block; the same on every rank for the same t_max."""
        return t_max * min(top_k, self.routes[layer].max_local)

    def dispatch(self, layer: int, x: torch.Tensor, routing: Routing, t_max: int | None = None
                 ) -> Pending[tuple[ExpertBatch, AllToAllHandle]]:
        routes = self.routes[layer]
        T, K = routing.expert_ids.shape
        R, D = self.world_size, x.shape[1]
        if t_max is None:
            assert R == 1, "a mesh step needs the step header's T_max"
            t_max = T
        C = self.capacity(layer, K, t_max)
        expert, dest = destinations(routes, routing.expert_ids)  # (T*K*S,) each
        if self.observer is not None:
            self.observer.sent(layer, dest)
        rows, overflow = send_rows(dest, R, C)  # (T*K*S,), ()
        send = torch.zeros(R * C + 1, D + 1, dtype=x.dtype, device=x.device)  # (R*C + 1, W) last row: nowhere
        ids = id_view(send)  # (R*C + 1, W) same bytes, integer dtype
        ids[:, D] = -1
        S = routes.max_shards
        token = torch.arange(T * K * S, device=x.device) // (K * S)  # (T*K*S,) token of each piece
        send[rows, :D] = x[token]  # gather + scatter (T*K*S, D)
        ids[rows, D] = expert.to(ids.dtype)  # scatter (T*K*S,)
        pending = self.collective.all_to_all(send[: R * C])  # (R*C, W) contiguous
        return _Then(pending, lambda recv: self._received(routes, recv, rows, overflow, (T, K, S)))

    def _received(self, routes: LayerRoutes, recv: torch.Tensor, rows: torch.Tensor, overflow: torch.Tensor,
                  shape: tuple[int, int, int]) -> tuple[ExpertBatch, AllToAllHandle]:
        """recv: (R*C, W) -> the ExpertBatch for this rank's experts and the combine handle."""
        D = recv.shape[1] - 1
        expert = id_view(recv)[:, D].to(torch.int64)  # (R*C,) -1 = padding
        local = torch.where(expert >= 0, routes.local_index[expert.clamp(min=0)], -1)  # gather (R*C,)
        unheld = ((expert >= 0) & (local < 0)).any()  # () a token for an expert not held here
        order, counts = group_by_expert(local, routes.num_local)  # (R*C,), (E_loc + 1,)
        flags = torch.stack([unheld, overflow]).to(torch.int64)  # (2,)
        host = torch.cat([counts, flags]).tolist()  # the layer's one host read-back
        E_loc = routes.num_local
        assert not host[E_loc + 2], "capacity overflow: a block had more pieces than the step's capacity"
        assert not host[E_loc + 1], "received a token for an expert this rank does not hold"
        per_local = host[:E_loc]
        recv_rows = order[: sum(per_local)]  # (N,) padding sorts last
        batch = ExpertBatch(x=recv[recv_rows, :D], counts=per_local)  # gather (N, D)
        return batch, AllToAllHandle(rows, recv_rows, (*shape, recv.shape[0]))

    def combine(self, layer: int, y: torch.Tensor, handle: AllToAllHandle) -> Pending[torch.Tensor]:
        back = torch.zeros(handle.shape[3], y.shape[1], dtype=y.dtype, device=y.device)  # (R*C, D)
        back[handle.recv_rows] = y  # scatter to the rows the copies arrived in
        return _Then(self.collective.all_to_all(back), lambda returned: _per_copy(returned, handle))
