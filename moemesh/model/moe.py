"""The MoE layer as four named seams: Router -> Dispatch -> Experts -> Combine.

Shape legend: T tokens on this rank, K experts per token (top-k), E experts per layer,
E_loc experts held on this rank, N token copies this rank's experts receive, D hidden,
F expert hidden.

Routers (moemesh.model.routers): softmax top-k (Mixtral, Qwen, OLMoE), top-k softmax over biased
logits (GPT-OSS) and grouped sigmoid (DeepSeek-V3, GLM-4.5). Experts: `GroupedExperts`
with the family's activation (moemesh.model.activations: SwiGLU, or GPT-OSS's clamped one) and optional biases. A
layer's shared experts (DeepSeek-V3, Qwen2-MoE) are dense work on this rank's own tokens: they run
after Dispatch is posted, while the routed exchange is in flight, and never go through the seams.

Router, Experts and the combine arithmetic are the same everywhere; what differs between a
single process and the mesh is only the `Transport` (dispatch + combine): `LocalTransport`
here, the gloo/NCCL all-to-all transports in `moemesh.mesh`. A transport is chosen once at
start-up and never switched on by `if backend ==` branches elsewhere.

Dispatch and combine *start* an exchange and return a `Pending`; `MoELayer.stages` is a
generator that yields while an exchange is in flight, so a scheduler can run another
micro-batch's compute meanwhile (two-batch overlap). Run to completion it is the plain layer.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

from moemesh.model.activations import Activation, swiglu
from moemesh.model.weights import LayerExperts, SharedExpertWeights

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


def shared_experts(x: torch.Tensor, w: SharedExpertWeights) -> torch.Tensor:
    """x: (T, D) -> (T, D): the shared SwiGLU expert(s), gated by sigmoid(x @ gate.T) when it has a gate."""
    gate, up = F.linear(x, w.w13).chunk(2, dim=-1)  # (T, Fs) each
    y = F.linear(F.silu(gate) * up, w.w2)  # (T, D)
    if w.gate is not None:
        y = torch.sigmoid(F.linear(x, w.gate)) * y  # (T, 1) * (T, D)
    return y


class GroupedExperts:
    """Gated experts of every MoE layer on this rank; biased experts (GPT-OSS) add their biases, the
    down bias once per expert (its shard 0).

    A layer whose experts are unbiased views of one stack (`stack_experts`, which the loader and
    `MoELayer.apply_epoch` apply) runs as two grouped matmuls over all its experts at once
    (`torch._grouped_mm`: one launch each instead of a Python loop of matmul pairs). Anything else
    (biased experts, mixed widths), or a device where the grouped matmul refuses the shapes, runs
    one matmul pair per expert with tokens.
    """

    def __init__(self, layers: dict[int, LayerExperts], activation: Activation = swiglu):
        self.layers = layers
        self.activation = activation
        self.grouped = True  # False once the device refused a grouped matmul
        self._stacks: dict[int, tuple[LayerExperts, tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def replace(self, layer: int, experts: LayerExperts) -> None:
        self.layers[layer] = experts

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.layers.values())

    def __call__(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        experts = self.layers[layer]
        stack = self._stack(layer, experts) if self.grouped and batch.x.shape[0] else None
        if stack is None:
            return self._one_by_one(experts, batch)
        w13, w2 = stack  # (E_loc, D, 2F), (E_loc, D, F)
        ends = torch.tensor(list(itertools.accumulate(batch.counts)), dtype=torch.int32).to(batch.x.device)  # (E_loc,)
        try:
            h = torch._grouped_mm(batch.x, w13, offs=ends)  # (N, 2F)
            gate, up = h.chunk(2, dim=-1)  # (N, F) each
            return torch._grouped_mm(self.activation(gate, up), w2.transpose(1, 2), offs=ends)  # (N, D)
        except RuntimeError:  # no grouped matmul for this device or dtype: never ask again
            self.grouped = False
            return self._one_by_one(experts, batch)

    def _stack(self, layer: int, experts: LayerExperts) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's (E_loc, D, 2F), (E_loc, D, F) stacks when its tensors are views of them; looked
        at once per LayerExperts (an epoch switch brings new ones)."""
        cached = self._stacks.get(layer)
        if cached is not None and cached[0] is experts:
            return cached[1]
        w13, w2 = stacked_view(experts.w13), stacked_view(experts.w2)
        stack = (w13, w2) if w13 is not None and w2 is not None and not experts.biased else None
        self._stacks[layer] = (experts, stack)
        return stack

    def _one_by_one(self, experts: LayerExperts, batch: ExpertBatch) -> torch.Tensor:
        out = torch.empty_like(batch.x)  # (N, D)
        start = 0
        for i, n in enumerate(batch.counts):
            if n:
                rows = batch.x[start : start + n]  # (n, D)
                h = torch.mm(rows, experts.w13[i]) if not experts.biased else torch.addmm(
                    experts.b13[i], rows, experts.w13[i])  # (n, 2F)
                gate, up = h.chunk(2, dim=-1)  # (n, F) each
                b2 = experts.b2[i] if experts.biased else None
                if b2 is None:
                    torch.mm(self.activation(gate, up), experts.w2[i].t(), out=out[start : start + n])  # (n, D)
                else:
                    torch.addmm(b2, self.activation(gate, up), experts.w2[i].t(), out=out[start : start + n])
                start += n
        return out


def stack_experts(experts: LayerExperts) -> LayerExperts:
    """The same experts with w13 and w2 as views of one (E_loc, D, 2F) and one (E_loc, D, F) stack
    (one copy at load time; the per-expert tensors are freed), so GroupedExperts can run them as
    grouped matmuls. Biased or mixed-width experts come back unchanged."""
    shapes = {(t.shape, t.dtype) for t in experts.w13} | {(t.shape, t.dtype, 2) for t in experts.w2}
    if experts.biased or len(shapes) != 2:
        return experts
    w13, w2 = torch.stack(experts.w13), torch.stack(experts.w2)  # (E_loc, D, 2F), (E_loc, D, F)
    return dataclasses.replace(experts, w13=tuple(w13.unbind(0)), w2=tuple(w2.unbind(0)))


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """(E_loc, ...) the stack `tensors` are consecutive equal views of, without a copy; None if they are not."""
    if not tensors:
        return None
    first = tensors[0]
    step = tensors[1].storage_offset() - first.storage_offset() if len(tensors) > 1 else first.numel()
    ptr = first.untyped_storage().data_ptr()
    for i, t in enumerate(tensors):
        if (t.shape != first.shape or t.stride() != first.stride() or t.untyped_storage().data_ptr() != ptr
                or t.storage_offset() != first.storage_offset() + i * step):
            return None
    if step < first.numel() or not first.is_contiguous():
        return None
    return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())


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
        the gating factors change together (a half-switched layer would route to the old ranks).
        A layer assembled from pieces is restacked (`stack_experts`: one copy of that layer's experts
        during the switch), so it keeps running as grouped matmuls and no reused view keeps a whole
        old stack alive."""
        self.experts.layers = {layer: e if stacked_view(e.w13) is not None and stacked_view(e.w2) is not None
                               else stack_experts(e) for layer, e in layers.items()}
        self.transport.set_placement(placement)
        self.set_gating(placement)

    def set_gating(self, placement: Placement) -> None:
        """The placement's load-aware gating factors on the router (none: the model's own routing).
        Set between steps only: at the first placement (the model is built with its experts, not
        its factors) and at every epoch switch."""
        self.router.factors = {layer: torch.tensor(f, dtype=torch.float32, device=self.device)
                               for layer, f in placement.gating.items()}

    def stages(
        self, layer: int, x: torch.Tensor, router_weight: torch.Tensor, t_max: int | None = None,
        shared: SharedExpertWeights | None = None,
    ) -> Generator[None, None, torch.Tensor]:
        """x: (T, D) -> (T, D), yielding while dispatch and while combine are in flight.
        T may be 0 on a mesh rank with no tokens: it still joins both exchanges. `t_max`: the
        micro-batch's most tokens on any rank (the step header's); None in a single process.
        `shared`: the layer's shared experts, computed while the dispatch is in flight."""
        routing = self.router(x, router_weight, layer)
        if self.recorder is not None:
            self.recorder.routed(layer, routing)
        pending = self.transport.dispatch(layer, x, routing, t_max)
        dense = shared_experts(x, shared) if shared is not None else None  # (T, D): overlaps the dispatch
        yield
        batch, handle = pending.wait()
        y = self.experts(layer, batch)  # (N, D)
        pending_out = self.transport.combine(layer, y, handle)
        yield
        per_copy = pending_out.wait()  # (T, K, D)
        # Sum over K in a fixed order (not scatter-add order): identical on every deployment.
        routed = (per_copy * routing.weights.unsqueeze(-1)).sum(dim=1)  # (T, D)
        return routed if dense is None else routed + dense

    def __call__(self, layer: int, x: torch.Tensor, router_weight: torch.Tensor,
                 t_max: int | None = None, shared: SharedExpertWeights | None = None) -> torch.Tensor:
        return run_to_end(self.stages(layer, x, router_weight, t_max, shared))


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
