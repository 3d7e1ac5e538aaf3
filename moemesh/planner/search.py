"""Placement search: round-robin, the paper's swap search, and ours. Pure numpy.

All three return a `Plan`: a moemesh.mesh.placement.Placement plus a `PlanReport` (its cost, the
round-robin cost it is compared with, run time, the swaps it accepted). Every one keeps the
constraints: each expert of each layer on >= 1 device, no device holding an expert twice, at most
P experts per device per layer (P = 1 when devices >= experts: the paper's rule), and the
experts a device holds over all layers fit its memory.

- `round_robin`: expert e on device e mod G; with spare devices, device r >= E holds a replica of
  expert r mod E (moemesh.mesh.placement.initial_placement).
- `swap_search`, the paper's loop (paper.md 1.1): start round-robin; find the most loaded link;
  try swapping a heavy expert that loads it with a light one on the other side; accept a swap
  only when the max link load goes down; stop when no candidate helps or the budget ends.
- `topology_aware`, ours: replicas for hot experts on spare slots (EPLB: the expert with the
  highest load per replica gets the next one), then units heaviest first onto the node with the
  least load per slot, counting as lighter the tokens a unit shares with experts already on that
  node (they cross InfiniBand once), then devices inside each node by balanced packing. Given the
  current placement it prefers to leave experts where they are. A layer whose busiest link ends
  up busier than round-robin's is refined by the paper's swaps and otherwise falls back to
  round-robin, so the result is never worse than round-robin on the max link load.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from moemesh.errors import ConfigError
from moemesh.mesh.placement import Placement, initial_placement
from moemesh.planner.cost import CostModel, CostOptions, ExpertShape, PlacementCost
from moemesh.planner.replicas import pack, replicate, units
from moemesh.planner.slots import EMPTY, from_placement, holds, slots_per_device, to_placement
from moemesh.planner.topology import Topology
from moemesh.planner.traffic import Traffic

_RELATIVE_GAIN = 1e-9  # a swap must lower the max link load by more than float noise


@dataclass(frozen=True)
class Problem:
    """What to place: a topology, the expected routing, the expert size, the cost options.

    `memory_fraction` of each device's memory may hold experts; the rest is for the dense part,
    activations and communication buffers.
    """

    topology: Topology
    traffic: Traffic
    shape: ExpertShape
    options: CostOptions = CostOptions()
    memory_fraction: float = 0.9

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
        return slots_per_device(self.num_experts, self.topology.devices)

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
class SwapBudget:
    """The swap search's limits: cost evaluations per layer, candidate swaps per round."""

    evaluations: int = 256
    tries: int = 16


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


# ---------------------------------------------------------------------------------------------
# Round-robin


def round_robin_slots(problem: Problem) -> np.ndarray:
    """[L, G, P] the paper's starting point (moemesh.mesh.placement.initial_placement)."""
    p = initial_placement(problem.num_experts, problem.layer_ids, problem.topology.devices)
    return from_placement(p, problem.layer_ids, problem.slots_per_device)


def round_robin(problem: Problem, epoch: int = 1) -> Plan:
    start = time.perf_counter()
    problem.check_memory()
    slots = round_robin_slots(problem)
    cost = problem.model.evaluate_slots(slots, problem.traffic)
    return _plan("round-robin", problem, slots, cost, cost, start, epoch)


# ---------------------------------------------------------------------------------------------
# The paper's swap search


def swap_search(problem: Problem, budget: SwapBudget = SwapBudget(), epoch: int = 1) -> Plan:
    """The paper's loop from round-robin, layer by layer (module docstring)."""
    start = time.perf_counter()
    problem.check_memory()
    slots = round_robin_slots(problem)
    rr = problem.model.evaluate_slots(slots, problem.traffic)
    steps: list[SwapStep] = []
    evaluations = 0
    for l in range(len(problem.layer_ids)):
        slots[l], layer_steps, n = swap_layer(problem, l, slots[l], budget)
        steps += layer_steps
        evaluations += n
    cost = problem.model.evaluate_slots(slots, problem.traffic)
    return _plan("swap", problem, slots, cost, rr, start, epoch, steps=steps, evaluations=evaluations)


def swap_layer(problem: Problem, l: int, slots: np.ndarray, budget: SwapBudget,
               stop_below_s: float = 0.0) -> tuple[np.ndarray, list[SwapStep], int]:
    """Swap search on one layer's slots [G, P]; returns (slots, accepted swaps, evaluations).

    Stops early once the max link load is at most `stop_below_s`.
    """
    t, model = problem.routed, problem.model
    x, coact, k = t.tokens[l], t.coactivation[l], t.top_k
    slots = slots.copy()
    current = model.layer_max_link_s(x, slots, coact, k)
    steps: list[SwapStep] = []
    evaluations = 0
    while evaluations < budget.evaluations and current > stop_below_s:
        # Step 1: the most loaded link, and swaps that could unload it
        loads = model.layer_loads(x, slots, coact, k)
        hot = int(model.links.time_s(loads.link_tokens * model.shape.token_bytes).argmax())
        candidates = _swap_candidates(problem, hot, slots, t.expert_tokens[l], budget.tries)
        # Step 2: accept the first candidate that lowers the max link load
        accepted = False
        for a, b in candidates:
            if evaluations >= budget.evaluations:
                break
            trial = _swapped(slots, a, b)
            evaluations += 1
            after = model.layer_max_link_s(x, trial, coact, k)
            if after < current * (1 - _RELATIVE_GAIN):
                steps.append(SwapStep(problem.layer_ids[l], a, b, current, after))
                slots, current, accepted = trial, after, True
                break
        # Step 3: stop when no candidate helps
        if not accepted:
            break
    return slots, steps, evaluations


def _swap_candidates(problem: Problem, link: int, slots: np.ndarray, expert_tokens: np.ndarray,
                     tries: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs ((device, slot) heavy, (device, slot) light) whose swap could unload `link`:
    a heavy expert whose traffic uses the link trades places with a light one that does not."""
    topo = problem.topology
    G, N = topo.devices, topo.nodes
    node = topo.node_of
    # Step 1: which devices' experts load the link (hot side) and where to move them (other side)
    if link < G:  # nvl-out:g sends to its node peers (and fans out landed tokens)
        g = link
        hot = (node == node[g]) & (np.arange(G) != g)
        other = ~hot
    elif link < 2 * G:  # nvl-in:g receives for its own experts
        hot = np.arange(G) == link - G
        other = ~hot
    elif link < 2 * G + N:  # ib-out:n: node n's sources send to experts off n
        hot = node != link - 2 * G
        other = ~hot
    else:  # ib-in:n: experts on n receive from other nodes
        hot = node == link - 2 * G - N
        other = ~hot
    # Step 2: heaviest units on the hot side x lightest on the other side
    replicas = np.bincount(slots[slots >= 0], minlength=len(expert_tokens))
    unit_load = np.where(slots >= 0, expert_tokens[np.maximum(slots, 0)] / np.maximum(replicas[np.maximum(slots, 0)], 1), -1.0)
    width = max(2, math.isqrt(tries) + 2)
    heavy = _ranked(unit_load, hot, descending=True)[:width]
    light = _ranked(unit_load, other, descending=False)[:width]
    pairs = []
    for a in heavy:
        for b in light:
            ea, eb = int(slots[a]), int(slots[b])
            if unit_load[a] <= unit_load[b] or ea == eb:
                continue
            if ea in slots[b[0]] or (eb >= 0 and eb in slots[a[0]]):
                continue  # a device would hold one expert twice
            pairs.append((unit_load[a] - unit_load[b], a, b))
    pairs.sort(key=lambda p: -p[0])
    return [(a, b) for _, a, b in pairs[:tries]]


def _ranked(unit_load: np.ndarray, devices: np.ndarray, descending: bool) -> list[tuple[int, int]]:
    """(device, slot) of the occupied slots on `devices`, by unit load."""
    g, k = np.nonzero((unit_load >= 0) & devices[:, None])
    order = np.argsort(-unit_load[g, k] if descending else unit_load[g, k], kind="stable")
    return [(int(g[i]), int(k[i])) for i in order]


def _swapped(slots: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> np.ndarray:
    out = slots.copy()
    out[a], out[b] = slots[b], slots[a]
    return out


# ---------------------------------------------------------------------------------------------
# Ours


def topology_aware(problem: Problem, current: Placement | None = None, refine: SwapBudget = SwapBudget(32),
                   node_stickiness: float = 0.5, device_stickiness: float = 0.25, epoch: int = 1) -> Plan:
    """Ours (module docstring). `current`: the placement now serving; experts stay put when
    that costs at most `node_stickiness` (`device_stickiness`) of their own load in balance."""
    start = time.perf_counter()
    problem.check_memory()
    t, topo = problem.routed, problem.topology
    G, P, E = topo.devices, problem.slots_per_device, problem.num_experts
    load = t.expert_tokens  # [L, E]
    now = None if current is None else from_placement(current, problem.layer_ids, P)
    # Step 1: replicas of hot experts on spare slots (EPLB)
    counts = replicate(load, G * P, max_replicas=G)  # [L, E]
    unit_expert, unit_load = units(load, counts)  # [L, U] heaviest first
    # Step 2: units onto nodes: least load per slot, co-activated tokens count once, stay put
    node_of_unit = _assign_nodes(problem, unit_expert, unit_load, counts, now, node_stickiness)  # [L, U]
    # Step 3: units onto devices inside each node: balanced packing, stay put
    slots = _assign_devices(problem, unit_expert, unit_load, node_of_unit, now, device_stickiness)  # [L, G, P]
    # Step 4: never a busier link than round-robin: refine with the paper's swaps, else fall back
    rr_slots = round_robin_slots(problem)
    rr = problem.model.evaluate_slots(rr_slots, problem.traffic)
    cost = problem.model.evaluate_slots(slots, problem.traffic)
    steps, fallback, evaluations = [], [], 0
    for l in np.nonzero(cost.max_link_s > rr.max_link_s)[0]:
        slots[l], layer_steps, n = swap_layer(problem, int(l), slots[l], refine, stop_below_s=rr.max_link_s[l])
        steps += layer_steps
        evaluations += n
        if problem.model.layer_max_link_s(t.tokens[l], slots[l], t.coactivation[l], t.top_k) > rr.max_link_s[l]:
            slots[l] = rr_slots[l]
            fallback.append(problem.layer_ids[l])
    if steps or fallback:
        cost = problem.model.evaluate_slots(slots, problem.traffic)
    return _plan("ours", problem, slots, cost, rr, start, epoch, steps=steps, evaluations=evaluations,
                 fallback=fallback)


def _assign_nodes(problem: Problem, unit_expert: np.ndarray, unit_load: np.ndarray, counts: np.ndarray,
                  now: np.ndarray | None, stickiness: float) -> np.ndarray:
    """Node of every unit, all layers at once, heaviest unit first.

    Parameters:
        unit_expert, unit_load: [L, U]; counts: [L, E] replicas; now: [L, G, P] current slots or None
    Returns:
        node_of_unit: [L, U]
    """
    topo, t = problem.topology, problem.routed
    L, U = unit_expert.shape
    N, E = topo.nodes, problem.num_experts
    sizes = topo.node_sizes
    capacity = problem.slots_per_device * sizes  # [N] slots per node
    # Co-activated tokens both landing on a node cross InfiniBand once, for sources off that node
    dedupe = problem.options.dedupe_per_node and N > 1
    co_weight = (1.0 - sizes / topo.devices) if dedupe else np.zeros(N)  # [N]
    held_now = _held_on_nodes(now, topo, E) if now is not None else np.zeros((L, E, N), dtype=bool)
    rows = np.arange(L)
    node_load = np.zeros((L, N))
    free = np.tile(capacity, (L, 1))  # [L, N]
    on_node = np.zeros((L, E, N), dtype=np.int64)
    pull = np.zeros((L, E, N))  # co-activated tokens between expert e and the units already on n
    node_of_unit = np.empty((L, U), dtype=np.int64)
    for u in range(U):
        e, a = unit_expert[:, u], unit_load[:, u]  # [L]
        r = counts[rows, e][:, None]  # [L, 1]
        # Step 1: nodes with a free slot and a device without this expert
        ok = (free > 0) & (on_node[rows, e] < sizes[None, :])  # [L, N]
        gain = co_weight[None, :] * pull[rows, e] / r  # [L, N]
        score = np.where(ok, (node_load + a[:, None] - gain) / capacity[None, :], np.inf)
        # Step 2: the lightest node; the node that holds the expert now if nearly as light
        bonus = stickiness * (a[:, None] / capacity[None, :]) * held_now[rows, e]
        n = np.argmin(score - bonus, axis=1)  # [L]
        node_of_unit[:, u] = n
        node_load[rows, n] += a - gain[rows, n]
        free[rows, n] -= 1
        on_node[rows, e, n] += 1
        pull[rows, :, n] += t.coactivation[rows, :, e] / r
    return node_of_unit


def _held_on_nodes(now: np.ndarray, topo: Topology, num_experts: int) -> np.ndarray:
    """[L, G, P] slots -> [L, E, N] bool: node n holds expert e now."""
    L = now.shape[0]
    out = np.zeros((L, num_experts, topo.nodes), dtype=bool)
    for l in range(L):
        g, k = np.nonzero(now[l] >= 0)
        out[l, now[l, g, k], topo.node_of[g]] = True
    return out


def _assign_devices(problem: Problem, unit_expert: np.ndarray, unit_load: np.ndarray, node_of_unit: np.ndarray,
                    now: np.ndarray | None, stickiness: float) -> np.ndarray:
    """Slots [L, G, P] from each unit's node: balanced packing over the node's devices."""
    topo = problem.topology
    L, U = unit_expert.shape
    G, P, E = topo.devices, problem.slots_per_device, problem.num_experts
    slots = np.full((L, G, P), EMPTY, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(topo.node_sizes)])  # first device of each node
    for l in range(L):
        held = holds(now[l], E) if now is not None else None  # [G, E]
        for n in range(topo.nodes):
            idx = np.nonzero(node_of_unit[l] == n)[0]  # heaviest first
            devices = np.arange(first[n], first[n + 1])
            experts = unit_expert[l, idx]
            preferred = _preferred_bins(experts, devices, held)
            if P == 1:
                bins = _stay_then_fill(preferred, len(devices))
            else:
                bins = pack(experts, unit_load[l, idx], len(devices), P, preferred, stickiness)
            fill = np.zeros(len(devices), dtype=np.int64)
            for e, b in zip(experts, bins):
                slots[l, devices[b], fill[b]] = e
                fill[b] += 1
    return slots


def _preferred_bins(experts: np.ndarray, devices: np.ndarray, held: np.ndarray | None) -> np.ndarray:
    """[U] index into `devices` of a device that holds the unit's expert now (-1 = none); two
    units of one expert prefer different devices."""
    out = np.full(len(experts), -1, dtype=np.int64)
    if held is None:
        return out
    used: set[tuple[int, int]] = set()
    for u, e in enumerate(experts):
        for i in np.nonzero(held[devices, e])[0]:
            if (int(e), int(i)) not in used:
                out[u] = i
                used.add((int(e), int(i)))
                break
    return out


def _stay_then_fill(preferred: np.ndarray, bins: int) -> np.ndarray:
    """One unit per bin: units keep their preferred bin when free, the rest fill in order."""
    out = np.full(len(preferred), -1, dtype=np.int64)
    taken = np.zeros(bins, dtype=bool)
    for u, b in enumerate(preferred):
        if b >= 0 and not taken[b]:
            out[u], taken[b] = b, True
    free = iter(np.nonzero(~taken)[0])
    for u in np.nonzero(out < 0)[0]:
        out[u] = next(free)
    return out


# ---------------------------------------------------------------------------------------------
# Entry point

METHODS = ("round-robin", "swap", "ours")


def plan(problem: Problem, method: str = "ours", current: Placement | None = None, epoch: int = 1) -> Plan:
    """Run one method ("round-robin", "swap" or "ours"); `current` only guides ours."""
    if method == "round-robin":
        return round_robin(problem, epoch)
    if method == "swap":
        return swap_search(problem, epoch=epoch)
    if method == "ours":
        return topology_aware(problem, current, epoch=epoch)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def _plan(method: str, problem: Problem, slots: np.ndarray, cost: PlacementCost, rr: PlacementCost, start: float,
          epoch: int, steps: list[SwapStep] = (), evaluations: int = 0, fallback: list[int] = ()) -> Plan:
    placement = to_placement(slots, problem.layer_ids, problem.num_experts, epoch=epoch, origin=f"planner:{method}")
    replicas = np.stack([np.bincount(s[s >= 0], minlength=problem.num_experts) for s in slots])
    report = PlanReport(method=method, cost=cost, round_robin=rr, runtime_s=time.perf_counter() - start,
                        replicas=replicas, swaps=tuple(steps), evaluations=evaluations,
                        fallback_layers=tuple(fallback))
    return Plan(placement=placement, slots=slots, report=report)
