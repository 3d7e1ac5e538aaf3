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

from dataclasses import dataclass
from collections.abc import Generator
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

from moemesh.model.overflow import OVERFLOW_POLICIES, enforce_capacity, expert_capacity
from moemesh.model.weights import LayerExperts


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
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing: ...


class Transport(Protocol):
    """Dispatch and Combine: moves token copies to the ranks holding their experts and back."""

    def dispatch(self, layer: int, x: torch.Tensor, routing: Routing, micro: int = 0) -> Pending[tuple[ExpertBatch, Any]]:
        """x: (T, D) -> the copies this rank's experts must compute, plus a handle for combine.
        `micro` is the micro-batch (its exchange buffers are sized for it)."""
        ...

    def combine(self, layer: int, y: torch.Tensor, handle: Any) -> Pending[torch.Tensor]:
        """y: (N, D) expert outputs in ExpertBatch order -> (T, K, D) outputs per token copy."""
        ...


class Experts(Protocol):
    def __call__(self, layer: int, batch: ExpertBatch) -> torch.Tensor: ...


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


class LocalTransport:
    """Every expert lives in this process (world size 1): dispatch is a sort, combine an unsort.

    Local expert i is global expert i.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, layer: int, x: torch.Tensor, routing: Routing, micro: int = 0) -> Done[tuple[ExpertBatch, Any]]:
        T, K = routing.expert_ids.shape
        flat = routing.expert_ids.reshape(-1)  # (T*K,) -1 = dropped by the router
        kept = torch.nonzero(flat >= 0).squeeze(1)  # (T*K',)
        order = kept[torch.argsort(flat[kept], stable=True)]  # (T*K',) copies grouped by expert
        counts = torch.bincount(flat[kept], minlength=self.num_experts).tolist()  # (E,)
        rows = x[order // K]  # gather (T*K', D)
        return Done((ExpertBatch(x=rows, counts=counts), (order, T, K)))

    def combine(self, layer: int, y: torch.Tensor, handle: Any) -> Done[torch.Tensor]:
        order, T, K = handle
        out = (torch.empty if order.numel() == T * K else torch.zeros)(T * K, y.shape[1], dtype=y.dtype,
                                                                        device=y.device)  # (T*K, D)
        out[order] = y  # scatter back to copy order (dropped copies stay zero)
        return Done(out.view(T, K, y.shape[1]))  # (T, K, D)


class MoELayer:
    """Router -> Dispatch -> Experts -> Combine for one step of tokens on this rank."""

    def __init__(self, router: Router, transport: Transport, experts: Experts):
        self.router = router
        self.transport = transport
        self.experts = experts

    def stages(
        self, layer: int, x: torch.Tensor, router_weight: torch.Tensor, micro: int = 0
    ) -> Generator[None, None, torch.Tensor]:
        """x: (T, D) -> (T, D), yielding while dispatch and while combine are in flight.
        T may be 0 on a mesh rank with no tokens: it still joins both exchanges."""
        routing = self.router(x, router_weight, layer)
        pending = self.transport.dispatch(layer, x, routing, micro)
        yield
        batch, handle = pending.wait()
        y = self.experts(layer, batch)  # (N, D)
        pending_out = self.transport.combine(layer, y, handle)
        yield
        per_copy = pending_out.wait()  # (T, K, D)
        # Sum over K in a fixed order (not scatter-add order): identical on every deployment.
        return (per_copy * routing.weights.unsqueeze(-1)).sum(dim=1)  # (T, D)

    def __call__(self, layer: int, x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
        return run_to_end(self.stages(layer, x, router_weight))


def run_to_end(stages: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Drive a stages() generator with nothing to overlap: the plain synchronous layer."""
    while True:
        try:
            next(stages)
        except StopIteration as stop:
            return stop.value
