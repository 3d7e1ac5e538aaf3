"""The MoE layer as four named seams: Router -> Dispatch -> Experts -> Combine.

Shape legend: T tokens on this rank, K experts per token (top-k), E experts per layer,
E_loc experts held on this rank, N token copies this rank's experts receive, D hidden,
F expert hidden.

Router, Experts and the combine arithmetic are the same everywhere; what differs between a
single process and the mesh is only the `Transport` (dispatch + combine): `LocalTransport`
here, the gloo/NCCL all-to-all transports in `moemesh.mesh`. A transport is chosen once at
start-up and never switched on by `if backend ==` branches elsewhere.

Dispatch and combine *start* an exchange and return a `Pending`; `MoELayer.stages` is a
generator that yields while an exchange is in flight, so a scheduler can run another
micro-batch's compute meanwhile (two-batch overlap). Run to completion it is the plain layer.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

from moemesh.model.overflow import OVERFLOW_POLICIES, enforce_capacity, expert_capacity
from moemesh.model.weights import LayerExperts

if TYPE_CHECKING:
    from moemesh.mesh.placement import Placement


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to and with what weight."""

    expert_ids: torch.Tensor  # (T, K) int64 global expert ids; -1 = dropped (overflow policy "drop")
    weights: torch.Tensor  # (T, K) float: combine weights, the model's own probabilities


@dataclass(frozen=True)
class ExpertBatch:
    """Token copies for this rank's experts, grouped by local expert.

    Rows [sum(counts[:i]), sum(counts[:i+1])) belong to local expert i. `counts` is a host-side
    list so the grouped matmul launches without a device sync.
    """

    x: torch.Tensor  # (N, D)
    counts: list[int]  # (E_loc,) rows per local expert


T_co = TypeVar("T_co", covariant=True)
H = TypeVar("H")  # a transport's dispatch handle: what its combine needs to put results back


class Pending(Protocol[T_co]):
    """An exchange in flight; wait() blocks until its result is here."""

    def wait(self) -> T_co: ...


class Done(Generic[T_co]):
    """A result that needed no communication."""

    def __init__(self, value: T_co):
        self.value = value

    def wait(self) -> T_co:
        return self.value


class Router(Protocol):
    factors: dict[int, torch.Tensor]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing: ...


class Transport(Protocol[H]):
    """Dispatch and Combine: moves token copies to the ranks holding their experts and back."""

    def dispatch(self, layer: int, x: torch.Tensor, routing: Routing, t_max: int | None = None
                 ) -> Pending[tuple[ExpertBatch, H]]:
        """x: (T, D) -> the copies this rank's experts must compute, plus a handle for combine.
        `t_max`: the most tokens any rank runs in this micro-batch (from the step header; sizes
        the exchange buffers the same on every rank). None in a single process: T."""
        ...

    def combine(self, layer: int, y: torch.Tensor, handle: H) -> Pending[torch.Tensor]:
        """y: (N, D) expert outputs in ExpertBatch order -> (T, K, D) outputs per token copy."""
        ...

    def set_placement(self, placement: Placement) -> None:
        """Switch routing tables to `placement` (between steps only)."""
        ...


class Experts(Protocol):
    layers: dict[int, LayerExperts]

    def __call__(self, layer: int, batch: ExpertBatch) -> torch.Tensor: ...


class RoutingObserver(Protocol):
    """Sees every layer's routing (the load recorder, moemesh.mesh.routing_counts)."""

    def routed(self, layer: int, routing: Routing) -> None: ...


class SoftmaxTopKRouter:
    """softmax over all experts in fp32, top-k, optional renormalisation (Mixtral always does).

    `factors[layer]` (E,) is the paper's load-aware gating (policy "gating"): experts are
    *selected* by probability x factor, but combined with the model's own probabilities. With no
    factors for a layer the routing is exactly the model's. Set between steps only.
    """

    def __init__(self, top_k: int, normalize: bool, overflow: str = "dropless", capacity_factor: float = 1.2):
        assert overflow in OVERFLOW_POLICIES, f"unknown overflow policy {overflow!r}"
        self.top_k = top_k
        self.normalize = normalize
        self.overflow = overflow
        self.capacity_factor = capacity_factor
        self.factors: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing:
        logits = F.linear(x, weight)  # (T, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
        factors = self.factors.get(layer)
        if factors is None:
            top_p, top_i = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        else:
            top_i = torch.topk(probs * factors, self.top_k, dim=-1).indices  # (T, K) adjusted choice
            top_p = torch.gather(probs, 1, top_i)  # (T, K) the model's own probabilities
        if self.overflow != "dropless":
            T, E = probs.shape
            top_i = enforce_capacity(top_i, probs, expert_capacity(T, self.top_k, E, self.capacity_factor),
                                     self.overflow)  # (T, K), -1 = dropped
            top_p = torch.gather(probs, 1, top_i.clamp(min=0)) * (top_i >= 0)  # (T, K)
        if self.normalize:  # (a token whose every copy was dropped keeps zero weights)
            top_p = top_p / top_p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(top_p.dtype).tiny)
        return Routing(expert_ids=top_i, weights=top_p.to(x.dtype))


class GroupedExperts:
    """SwiGLU experts of every MoE layer on this rank, one matmul pair per expert with tokens."""

    def __init__(self, layers: dict[int, LayerExperts]):
        self.layers = layers

    def replace(self, layer: int, experts: LayerExperts) -> None:
        self.layers[layer] = experts

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.layers.values())

    def __call__(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        experts = self.layers[layer]
        out = torch.empty_like(batch.x)  # (N, D)
        start = 0
        for i, n in enumerate(batch.counts):
            if n:
                rows = batch.x[start : start + n]  # (n, D)
                gate, up = torch.mm(rows, experts.w13[i]).chunk(2, dim=-1)  # (n, F) each
                torch.mm(F.silu(gate) * up, experts.w2[i].t(), out=out[start : start + n])  # (n, D)
                start += n
        return out


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids: (N,) int64 in [-1, E), -1 = nothing -> (order, counts) with no host sync:
    order (N,) stably sorts the ids with -1 last; counts (E + 1,) per expert, the last for -1."""
    key = torch.where(expert_ids >= 0, expert_ids, num_experts)  # (N,) -1 -> bucket E
    order = torch.argsort(key, stable=True)  # (N,)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_ids.device)  # (E + 1,)
    counts.scatter_add_(0, key, torch.ones_like(key))  # (E + 1,)
    return order, counts


@dataclass(frozen=True)
class LocalHandle:
    order: torch.Tensor  # (N,) token copy (row of T*K) of each ExpertBatch row
    shape: tuple[int, int]  # (T, K)


class LocalTransport:
    """Every expert lives in this process (world size 1): dispatch is a sort, combine an unsort.

    Local expert i is global expert i. One host read-back per layer: the counts.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def set_placement(self, placement: Placement) -> None:
        assert placement.world_size == 1, "a local transport holds every expert in one process"

    def dispatch(self, layer: int, x: torch.Tensor, routing: Routing, t_max: int | None = None
                 ) -> Done[tuple[ExpertBatch, LocalHandle]]:
        T, K = routing.expert_ids.shape
        order, counts = group_by_expert(routing.expert_ids.reshape(-1), self.num_experts)  # (T*K,), (E + 1,)
        per_expert = counts.tolist()  # the one host read-back
        order = order[: T * K - per_expert[-1]]  # (N,) dropped copies sort last: cut them
        rows = x[order // K]  # gather (N, D)
        return Done((ExpertBatch(x=rows, counts=per_expert[:-1]), LocalHandle(order, (T, K))))

    def combine(self, layer: int, y: torch.Tensor, handle: LocalHandle) -> Done[torch.Tensor]:
        T, K = handle.shape
        order = handle.order
        out = (torch.empty if order.numel() == T * K else torch.zeros)(T * K, y.shape[1], dtype=y.dtype,
                                                                        device=y.device)  # (T*K, D)
        out[order] = y  # scatter back to copy order (dropped copies stay zero)
        return Done(out.view(T, K, y.shape[1]))  # (T, K, D)


class MoELayer(Generic[H]):
    """Router -> Dispatch -> Experts -> Combine for one step of tokens on this rank.

    `recorder` (optional) sees every layer's routing: load statistics live outside the transport.
    """

    def __init__(self, router: Router, transport: Transport[H], experts: Experts,
                 recorder: RoutingObserver | None = None, device: str | torch.device = "cpu"):
        self.router = router
        self.transport = transport
        self.experts = experts
        self.recorder = recorder
        self.device = torch.device(device)  # where gating factors live (the tokens' device)

    def apply_epoch(self, placement: Placement, layers: Mapping[int, LayerExperts]) -> None:
        """Switch to a placement epoch, between steps: the experts held, the routing tables and
        the gating factors change together (a half-switched layer would route to the old ranks)."""
        self.experts.layers = dict(layers)
        self.transport.set_placement(placement)
        self.router.factors = {layer: torch.tensor(f, dtype=torch.float32, device=self.device)
                               for layer, f in placement.gating.items()}

    def stages(
        self, layer: int, x: torch.Tensor, router_weight: torch.Tensor, t_max: int | None = None
    ) -> Generator[None, None, torch.Tensor]:
        """x: (T, D) -> (T, D), yielding while dispatch and while combine are in flight.
        T may be 0 on a mesh rank with no tokens: it still joins both exchanges. `t_max`: the
        micro-batch's most tokens on any rank (the step header's); None in a single process."""
        routing = self.router(x, router_weight, layer)
        if self.recorder is not None:
            self.recorder.routed(layer, routing)
        pending = self.transport.dispatch(layer, x, routing, t_max)
        yield
        batch, handle = pending.wait()
        y = self.experts(layer, batch)  # (N, D)
        pending_out = self.transport.combine(layer, y, handle)
        yield
        per_copy = pending_out.wait()  # (T, K, D)
        # Sum over K in a fixed order (not scatter-add order): identical on every deployment.
        return (per_copy * routing.weights.unsqueeze(-1)).sum(dim=1)  # (T, D)

    def __call__(self, layer: int, x: torch.Tensor, router_weight: torch.Tensor,
                 t_max: int | None = None) -> torch.Tensor:
        return run_to_end(self.stages(layer, x, router_weight, t_max))


def run_to_end(stages: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Drive a stages() generator with nothing to overlap: the plain synchronous layer."""
    while True:
        try:
            next(stages)
        except StopIteration as stop:
            return stop.value


def run_interleaved(stages: Sequence[Generator[None, None, torch.Tensor]]) -> list[torch.Tensor]:
    """Drive several stages() generators round robin, each advancing to its next exchange, so one
    computes while another's exchange is in flight; their results in order. The order is fixed by the
    list alone, so it is the same on every rank (cross-rank invariant: the exchanges pair up)."""
    results: dict[int, torch.Tensor] = {}
    live = list(range(len(stages)))
    while live:
        for i in list(live):
            try:
                next(stages[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return [results[i] for i in range(len(stages))]
