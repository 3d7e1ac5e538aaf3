"""The paper's swap search (paper.md 1.1, "Topology-Aware Placement Algorithm"). Pure numpy.

Start round-robin (expert e -> device e mod G). Repeat: find the most loaded link; list swaps of
a heavy expert whose traffic uses that link with a light expert on the other side; evaluate them
in order and accept the first that lowers the max link load. Stop when no candidate helps or the
budget of cost evaluations ends. Every accepted swap is recorded with the max link load before
and after it, so tests can check that each one lowered it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from moemesh.planner.problem import (
    Plan,
    Problem,
    SwapStep,
    make_plan,
    round_robin_slots,
)

_RELATIVE_GAIN = 1e-9  # a swap must lower the max link load by more than float noise


@dataclass(frozen=True)
class SwapBudget:
    """The swap search's limits: cost evaluations per layer, candidate swaps per round."""

    evaluations: int = 256
    tries: int = 16


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
    return make_plan("swap", problem, slots, cost, rr, start, epoch, steps=steps, evaluations=evaluations)


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
        loads = model.loads(x[None], slots[None], coact[None], k)
        hot = int(model.links.time_s(loads.link_tokens[0] * model.shape.token_bytes).argmax())
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
    held = np.maximum(slots, 0)  # empty slots read expert 0, masked below
    unit_load = np.where(slots >= 0, expert_tokens[held] / np.maximum(replicas[held], 1), -1.0)
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


