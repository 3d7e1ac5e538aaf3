"""The planning problem and its answer: Problem in, Plan (Placement + PlanReport) out. Pure numpy.

Every method (moemesh.planner.search) takes a Problem and returns a Plan that keeps the
constraints: each expert of each layer on >= 1 device, no device holding an expert twice, at most
P experts per device per layer (P = 1 when devices >= experts: the paper's rule), and the experts
a device holds over all layers fit its memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from moemesh.errors import ConfigError
from moemesh.mesh.placement import Placement
from moemesh.planner.cost import CostModel, CostOptions, ExpertShape, PlacementCost
from moemesh.planner.slots import slots_per_device, to_placement
from moemesh.planner.topology import Topology
from moemesh.planner.traffic import Traffic


@dataclass(frozen=True)
class Problem:
    """What to place: a topology, the expected routing, the expert size, the cost options.

    `memory_fraction` of each device's memory may hold experts; the rest is for the dense part,
    activations and communication buffers. `slots` = P, experts per device per layer: by default
    ceil(E / G), which is 1 when G >= E (the paper's rule, which then cannot be raised); with
    G < E a larger P leaves G x P - E spare slots for replicas (EPLB's redundant experts).
    """

    topology: Topology
    traffic: Traffic
    shape: ExpertShape
    options: CostOptions = CostOptions()
    memory_fraction: float = 0.9
    slots: int | None = None

    def __post_init__(self) -> None:
        if self.slots is not None:
            least = slots_per_device(self.num_experts, self.topology.devices)
            if self.slots < least or (least == 1 and self.slots != 1):
                raise ConfigError(
                    f"slots per device {self.slots}: {self.num_experts} experts on {self.topology.devices} devices "
                    f"need {least}" + (" and allow no more (one expert per device per layer)" if least == 1 else "")
                )

    @cached_property
    def routed(self) -> Traffic:
        """The traffic with one source per device."""
        return self.traffic.with_sources(self.topology.devices)

    @cached_property
    def model(self) -> CostModel:
        return CostModel(self.topology, self.shape, self.options)

    @property
    def num_experts(self) -> int:
        return self.traffic.num_experts

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.traffic.layer_ids

    @property
    def slots_per_device(self) -> int:
        """P: experts per device per layer."""
        return self.slots or slots_per_device(self.num_experts, self.topology.devices)

    def check_memory(self) -> None:
        """ConfigError unless P experts per layer, every layer, fit in a device's expert memory."""
        need = len(self.layer_ids) * self.slots_per_device * self.shape.expert_bytes
        have = self.memory_fraction * self.topology.device_memory_bytes
        if need > have:
            raise ConfigError(
                f"{len(self.layer_ids)} layers x {self.slots_per_device} expert(s) x "
                f"{self.shape.expert_bytes / 1e9:.3g} GB = {need / 1e9:.3g} GB per device, but "
                f"{self.memory_fraction:.0%} of {self.topology.device_memory_bytes / 1e9:.3g} GB = "
                f"{have / 1e9:.3g} GB is available: add devices or use a bigger device"
            )


@dataclass(frozen=True)
class SwapStep:
    """One accepted swap: the experts in (device, slot) a and b traded places."""

    layer: int  # MoE layer id
    a: tuple[int, int]
    b: tuple[int, int]
    before_s: float  # max link load before
    after_s: float  # and after (always lower)


@dataclass(frozen=True)
class PlanReport:
    method: str
    cost: PlacementCost
    round_robin: PlacementCost
    runtime_s: float
    replicas: np.ndarray  # [L, E] replicas per expert
    swaps: tuple[SwapStep, ...] = ()
    evaluations: int = 0  # layer cost evaluations the search made
    fallback_layers: tuple[int, ...] = ()  # layers ours left round-robin

    @property
    def link_gain(self) -> float:
        """Round-robin's summed max link load / this plan's (> 1 = lighter links)."""
        return self.round_robin.total_max_link_s / max(self.cost.total_max_link_s, 1e-30)

    @property
    def time_gain(self) -> float:
        """Round-robin's predicted time through all MoE layers / this plan's."""
        return self.round_robin.total_layer_s / max(self.cost.total_layer_s, 1e-30)


@dataclass(frozen=True)
class Plan:
    placement: Placement
    slots: np.ndarray = field(repr=False)  # [L, G, P]
    report: PlanReport


def round_robin_slots(problem: Problem) -> np.ndarray:
    """[L, G, P] the paper's starting point: device g holds experts g, g + G, ... (< E); with
    spare devices (G > E) device g >= E holds a replica of expert g mod E. The same table as
    moemesh.mesh.placement.initial_placement."""
    E, G, P = problem.num_experts, problem.topology.devices, problem.slots_per_device
    experts = np.arange(G)[:, None] + G * np.arange(P)[None, :]  # [G, P]
    table = np.where(experts < E, experts, -1)
    if G > E:
        table[E:, 0] = np.arange(E, G) % E
    return np.repeat(table[None], len(problem.layer_ids), axis=0)


def make_plan(method: str, problem: Problem, slots: np.ndarray, cost: PlacementCost, rr: PlacementCost, start: float,
              epoch: int, steps: Sequence[SwapStep] = (), evaluations: int = 0, fallback: Sequence[int] = ()) -> Plan:
    """Wrap slots [L, G, P] and their cost into a Plan; `start` = perf_counter() when planning began."""
    placement = to_placement(slots, problem.layer_ids, problem.num_experts, epoch=epoch, origin=f"planner:{method}")
    replicas = np.stack([np.bincount(s[s >= 0], minlength=problem.num_experts) for s in slots])
    report = PlanReport(method=method, cost=cost, round_robin=rr, runtime_s=time.perf_counter() - start,
                        replicas=replicas, swaps=tuple(steps), evaluations=evaluations,
                        fallback_layers=tuple(fallback))
    return Plan(placement=placement, slots=slots, report=report)
