"""Turning load reports into new placement epochs, per balancing policy. Pure: no gRPC.

Policies (chosen per deployment by `resolve_policy`, shown in ModelInfo):
- "none": nothing moves.
- "gating": the paper's load-aware gating (coordinator/gating.py); outputs differ from the exact
  model's by how much tests/coordinator/test_gating.py measures.
- "replicate": placement and replicas only (moemesh.planner); outputs stay exactly the model's.
- "split": hot experts split over two ranks (tensor parallelism inside an expert;
  coordinator/splitting.py); outputs are the model's up to float rounding.

The coordinator calls `observe` for every load report; a returned placement is published as the
next epoch (workers prepare it in the background and switch at one step). Every
`update_every_tokens` routed tokens (100, the paper's period) one cycle ends:
- "gating" updates the gating factors from the last `window_cycles` cycles' counts;
- "replicate" plans a placement for the measured traffic (moemesh.planner: replicas of hot
  experts on spare devices, topology-aware), prices the move against the current placement, and
  publishes only the layers whose predicted gain over the next `price_window_tokens` pays for
  their weight transfer. Outputs stay exactly the model's.
- "split" splits the hottest whole expert of a straggling rank with the least busy rank
  (coordinator/splitting.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch

from coordinator.gating import GatingSettings, update_factors
from coordinator.splitting import Memory, SplitSettings, split_hot_experts
from moemesh.errors import ConfigError
from moemesh.mesh.placement import Placement
from moemesh.planner.cost import ExpertShape
from moemesh.planner.problem import Problem
from moemesh.planner.search import keep_paying, plan, price_change
from moemesh.planner.topology import resolve_topology
from moemesh.planner.traffic import from_counts

POLICIES = ("none", "gating", "replicate", "split")


def resolve_policy(requested: str, workers: int, num_experts: int, expert_shards: int = 1) -> str:
    """"auto" (the default): replicate where spare devices exist (more workers than experts: the
    spares hold replicas of hot experts), else none. Explicit policies pass through.
    Split experts (expert_shards != 1) resolve auto to none: the planner places whole experts."""
    if requested != "auto":
        return requested
    return "replicate" if workers > num_experts and expert_shards == 1 else "none"


@dataclass(frozen=True)
class RebalanceSettings:
    policy: str = "none"
    update_every_tokens: int = 100
    window_cycles: int = 3  # cycles of counts a decision looks at
    gating: GatingSettings = GatingSettings()
    split: SplitSettings = SplitSettings()
    topology: str = "local"  # planner topology: a preset name or a YAML file
    price_window_tokens: float = 100_000  # a move must pay for itself within this many tokens
    load_bandwidth_bytes_per_s: float = 1e9  # how fast a worker loads new experts (checkpoint read)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.update_every_tokens < 1:
            raise ConfigError(f"--rebalance-every must be >= 1 token, got {self.update_every_tokens}")


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs to know about the model."""

    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    dtype_bytes: int


class Rebalancer:
    def __init__(self, settings: RebalanceSettings, moe_layer_ids: tuple[int, ...], num_experts: int,
                 facts: ModelFacts | None = None):
        if settings.policy in ("replicate", "split") and facts is None:
            raise ConfigError(f"policy {settings.policy} needs the model's shape")
        self.s = settings
        self.facts = facts
        self.layers = moe_layer_ids
        self.num_experts = num_experts
        self._pending = torch.zeros(len(moe_layer_ids), num_experts, dtype=torch.int64)  # (L, E)
        self._pending_tokens = 0
        self._recent: deque[torch.Tensor] = deque(maxlen=settings.window_cycles)
        self.memory = Memory()  # the world's reported memory (policy split); set when a world forms

    def reset(self, memory: Memory) -> None:
        """A new world formed: forget the old world's counts (a window never straddles two
        worlds) and take the new world's memory."""
        self._pending = torch.zeros_like(self._pending)
        self._pending_tokens = 0
        self._recent.clear()
        self.memory = memory

    def observe(self, window_tokens: int, counts: torch.Tensor, current: Placement) -> Placement | None:
        """counts: (L, E) one worker's report. Returns the next placement (epoch unassigned) or None."""
        if self.s.policy == "none":
            return None
        self._pending += counts
        self._pending_tokens += window_tokens
        if self._pending_tokens < self.s.update_every_tokens:
            return None
        self._recent.append(self._pending)
        self._pending = torch.zeros_like(self._pending)
        self._pending_tokens = 0
        if self.s.policy == "replicate":
            return self._replan(current)
        if self.s.policy == "split":
            split = split_hot_experts(current, self._window(), self.layers, self._facts().expert_intermediate_size,
                                      self.s.split, self.memory)
            return replace(split, origin="split") if split is not None else None
        factors = torch.tensor([current.gating.get(layer, (1.0,) * self.num_experts) for layer in self.layers])
        new = update_factors(factors, self._window(), self.s.gating)  # (L, E)
        if torch.allclose(new, factors):
            return None
        gating = {layer: tuple(float(f) for f in new[i]) for i, layer in enumerate(self.layers)}
        return replace(current, gating=gating, origin="gating")

    def _window(self) -> torch.Tensor:
        """(L, E) the counts of the last `window_cycles` cycles."""
        return torch.stack(tuple(self._recent)).sum(dim=0)  # (L, E)

    def _facts(self) -> ModelFacts:
        assert self.facts is not None, "checked in __init__ for the policies that plan"
        return self.facts

    def _replan(self, current: Placement) -> Placement | None:
        if current.has_shard_groups:
            return None  # the planner places whole experts; it never undoes a split (docs/architecture.md)
        f = self._facts()
        traffic = from_counts(self._window(), top_k=f.top_k, sources=current.world_size, layer_ids=self.layers)
        shape = ExpertShape(hidden_size=f.hidden_size, intermediate_size=f.expert_intermediate_size,
                            dtype_bytes=f.dtype_bytes)
        problem = Problem(resolve_topology(self.s.topology, current.world_size), traffic, shape)
        proposed = plan(problem, current=current).placement
        price = price_change(current, proposed, problem, self.s.price_window_tokens,
                             transfer_bandwidth_bytes_per_s=self.s.load_bandwidth_bytes_per_s)
        new = keep_paying(current, proposed, price)
        if new.replicas == current.replicas:
            return None
        return replace(new, epoch=current.epoch, gating=current.gating, origin="replicate")
