"""Ours: topology-aware placement with redundant experts. Pure numpy.

Per layer, from the expected routing (shape legend: L layers, E experts, G devices, N nodes,
P slots per device per layer, U = G x P units, one "bin" = one device's P slots):

1. Replicas: the spare slots (G x P - E) go to hot experts, EPLB-style: repeatedly the expert
   with the highest load per replica gets one more (moemesh.planner.replicas.replicate). Each
   replica (a "unit") carries load / replicas: the transport splits an expert's tokens evenly.
2. Bins: P = 1: one unit per bin. P > 1: balanced packing of the units into G bins of P slots
   (heaviest first into the lightest bin without that expert), then swaps out of the heaviest
   bin while that helps. A device's compute is its bin's load, wherever the bin goes next.
3. Nodes, greedy: bins heaviest first, each onto the node whose InfiniBand port stays lightest,
   pricing InfiniBand as the cost model does: tokens crossing into a node = max(copies - pairs,
   copies / K), pairs = a token's copies for two experts on that node (co-activation: they
   cross once, then fan out over NVLink). Hot experts spread over nodes; co-activated ones gather.
4. Nodes, refined: the paper's loop at node level with every candidate priced at once: swap a
   bin of the node with the busiest InfiniBand port with any bin elsewhere, taking the swap
   that lowers the busier of the two nodes most, while one does.
5. Devices: a node's bins fill its devices. With the current placement given, nodes of equal
   size and devices inside a node are relabelled to keep as many experts in place as possible
   (what a node or device carries does not change, only which one carries it); without one,
   layer l is rotated by l so the hottest bins do not stack on one device across layers.
6. Guard: a layer whose busiest link is busier than round-robin's is refined by the paper's swaps
   (moemesh.planner.swap) and otherwise left round-robin, so the result is never worse than
   round-robin on max link load.
"""

from __future__ import annotations

import time

import numpy as np

from moemesh.mesh.placement import Placement
from moemesh.planner.problem import (
    Plan,
    Problem,
    SwapStep,
    make_plan,
    round_robin_slots,
)
from moemesh.planner.replicas import improve_pack, pack, replicate, units
from moemesh.planner.slots import from_placement
from moemesh.planner.swap import SwapBudget, swap_layer
from moemesh.planner.topology import Topology

_RELATIVE_GAIN = 1e-9
_WARM_TOLERANCE = 0.02  # replanning from a current placement stops evening out within 2% of the mean


def topology_aware(problem: Problem, current: Placement | None = None, node_rounds: int = 64,
                   pack_rounds: int = 256, guard: SwapBudget = SwapBudget(32), epoch: int = 1) -> Plan:
    """Ours (module docstring). `current`: the placement serving now, to keep experts in place.
    `node_rounds` / `pack_rounds`: swap rounds per layer of steps 4 / 2; `guard`: the swap budget
    of a layer that ends up worse than round-robin."""
    start = time.perf_counter()
    problem.check_memory()
    t, topo = problem.routed, problem.topology
    G, P = topo.devices, problem.slots_per_device
    load = t.expert_tokens  # [L, E]
    now = None  # [L, G, P'] the current slots when the current placement is of this world
    if current is not None and current.world_size == G and set(problem.layer_ids) <= set(current.layers):
        now = from_placement(current, problem.layer_ids)
    # Step 1: replicas of hot experts on the spare slots (EPLB), as many as pack best
    counts = _replica_counts(load, G, P, pack_rounds)  # [L, E]
    unit_expert, unit_load = units(load, counts)  # [L, U] heaviest first
    # Step 2: units into bins of P slots, balanced; from the current devices' contents if given
    if now is None:
        bins = _bins(unit_expert, unit_load, G, P, pack_rounds)  # [L, G, P] experts of each bin
    else:
        bins = _warm_bins(unit_expert, unit_load, now, G, P, pack_rounds)  # bin g = device g now
    # Step 3: bins onto nodes, greedy (or where they are now)
    bin_load, self_pairs, bin_pairs = _bin_traffic(problem, bins, counts)
    if now is None:
        node_of_bin = _assign_nodes(problem, bin_load, self_pairs, bin_pairs)  # [L, G]
    else:
        node_of_bin = np.tile(topo.node_of, (len(load), 1))
    # Step 4: node-level swaps while the busiest InfiniBand port gets lighter
    node_of_bin = _refine_nodes(problem, bin_load, self_pairs, bin_pairs, node_of_bin, node_rounds,
                                0.0 if now is None else _WARM_TOLERANCE)
    # Step 5: a node's bins fill its devices; keep experts in place, or rotate layers
    order = np.argsort(node_of_bin, axis=1, kind="stable")  # every node gets exactly its size in bins
    slots = np.take_along_axis(bins, order[:, :, None], axis=1)  # [L, G, P]
    slots = _rotate(slots, topo) if now is None else _align(slots, now, topo, problem.num_experts)
    # Step 6: never a busier link than round-robin
    rr_slots = round_robin_slots(problem)
    rr = problem.model.evaluate_slots(rr_slots, problem.traffic)
    cost = problem.model.evaluate_slots(slots, problem.traffic)
    steps: list[SwapStep] = []
    fallback: list[int] = []
    evaluations = 0
    for l in np.nonzero(cost.max_link_s > rr.max_link_s)[0]:
        slots[l], layer_steps, n = swap_layer(problem, int(l), slots[l], guard, stop_below_s=rr.max_link_s[l])
        steps += layer_steps
        evaluations += n
        if problem.model.layer_max_link_s(t.tokens[l], slots[l], t.coactivation[l], t.top_k) > rr.max_link_s[l]:
            slots[l] = rr_slots[l]
            fallback.append(problem.layer_ids[l])
    if steps or fallback:
        cost = problem.model.evaluate_slots(slots, problem.traffic)
    return make_plan("ours", problem, slots, cost, rr, start, epoch, steps=steps, evaluations=evaluations,
                     fallback=fallback)


def _replica_counts(load: np.ndarray, G: int, P: int, rounds: int) -> np.ndarray:
    """[L, E] replicas per expert. P = 1: every spare device gets a replica (EPLB). P > 1: EPLB's
    order, but stopping at the number of spare slots (of 8 tried, up to all) whose units pack
    into the most even bins: when many units are just over half a bin, fewer, bigger units
    pack better (a bin takes one unit and a few small ones)."""
    E = load.shape[1]
    spare = G * P - E
    if P == 1 or spare <= 0:
        return replicate(load, G * P, max_replicas=G)
    best_counts, best_max = None, None
    for k in sorted({round(spare * f / 8) for f in range(1, 9)}):
        counts = replicate(load, E + k, max_replicas=G)
        unit_expert, unit_load = units(load, counts)
        bins = _bins(unit_expert, unit_load, G, P, rounds)
        worst = _bin_loads(bins, load / counts).max(axis=1)  # [L]
        if best_counts is None or best_max is None:
            best_counts, best_max = counts, worst
            continue
        better = worst < best_max * (1 - 1e-6)  # ties keep fewer replicas (fewer bytes to load)
        best_counts = np.where(better[:, None], counts, best_counts)
        best_max = np.where(better, worst, best_max)
    assert best_counts is not None, "at least one k is tried"
    return best_counts


def _bin_loads(bins: np.ndarray, per_replica: np.ndarray) -> np.ndarray:
    """bins [L, G, P] (-1 = empty), per_replica [L, E] -> [L, G] copies per bin."""
    L, E = per_replica.shape
    padded = np.concatenate([per_replica, np.zeros((L, 1))], axis=1)  # index E = empty slot
    return padded[np.arange(L)[:, None, None], np.where(bins >= 0, bins, E)].sum(axis=2)


def _bins(unit_expert: np.ndarray, unit_load: np.ndarray, G: int, P: int, rounds: int) -> np.ndarray:
    """Units [L, U] (heaviest first, U <= G x P) -> bins [L, G, P]: experts, balanced by load."""
    L = unit_expert.shape[0]
    if P == 1:
        return unit_expert[:, :, None].copy()
    bin_of = pack(unit_expert, unit_load, G, P)  # [L, U]
    out = np.full((L, G, P), -1, dtype=np.int64)
    for l in range(L):
        improved = improve_pack(unit_expert[l], unit_load[l], bin_of[l], G, rounds)
        _fill(out[l], improved, unit_expert[l])
    return out


def _warm_bins(unit_expert: np.ndarray, unit_load: np.ndarray, now: np.ndarray, G: int, P: int,
               rounds: int) -> np.ndarray:
    """Bins [L, G, P] where bin g starts from device g's current experts: each unit stays on a
    device holding its expert now while there is one; the rest go, heaviest first, to the
    lightest bin with room; then swaps out of the heaviest bin while that helps (P > 1)."""
    L, U = unit_expert.shape
    out = np.full((L, G, P), -1, dtype=np.int64)
    for l in range(L):
        holders: dict[int, list[int]] = {}
        for g, k in zip(*np.nonzero(now[l] >= 0)):
            holders.setdefault(int(now[l, g, k]), []).append(int(g))
        fill, load = np.zeros(G, dtype=np.int64), np.zeros(G)
        has: list[set[int]] = [set() for _ in range(G)]
        bin_of = np.full(U, -1, dtype=np.int64)
        # Step 1: units stay where their expert is now
        for u, e in enumerate(unit_expert[l].tolist()):
            if e < 0:
                continue  # padding
            while holders.get(e):
                g = holders[e].pop(0)
                if fill[g] < P:
                    bin_of[u] = g
                    break
            if bin_of[u] >= 0:
                fill[g] += 1
                load[g] += unit_load[l, u]
                has[g].add(e)
        # Step 2: the rest, heaviest first, into the lightest bin with room and without the expert
        for u in np.nonzero((bin_of < 0) & (unit_expert[l] >= 0))[0].tolist():
            e = int(unit_expert[l, u])
            allowed = [g for g in range(G) if fill[g] < P and e not in has[g]]
            g = min(allowed, key=load.__getitem__)
            bin_of[u] = g
            fill[g] += 1
            load[g] += unit_load[l, u]
            has[g].add(e)
        # Step 3: even out
        if P > 1:
            bin_of = improve_pack(unit_expert[l], unit_load[l], bin_of, G, rounds, _WARM_TOLERANCE)
        _fill(out[l], bin_of, unit_expert[l])
    return out


def _fill(out: np.ndarray, bin_of: np.ndarray, unit_expert: np.ndarray) -> None:
    """Write units into out [G, P] (pre-filled with -1) by their bin."""
    fill = np.zeros(out.shape[0], dtype=np.int64)
    for b, e in zip(bin_of.tolist(), unit_expert.tolist()):
        if e >= 0:
            out[b, fill[b]] = e
            fill[b] += 1


def _bin_traffic(problem: Problem, bins: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per layer and bin: copies, co-activated pairs inside the bin, and pairs between bins.

    Returns:
        bin_load: [L, G] copies; self_pairs: [L, G]; bin_pairs: [L, G, G] (zero diagonal)
    """
    t = problem.routed
    L, G, P = bins.shape
    bin_load = _bin_loads(bins, t.expert_tokens / counts)  # [L, G]
    if not problem.options.dedupe_per_node or problem.topology.nodes == 1:
        return bin_load, np.zeros((L, G)), np.zeros((L, G, G))
    # pairs of one token's copies for expert e on bin b and f on bin c: C[e, f] / (r_e r_f)
    pairs = np.empty((L, G, G))
    for l in range(L):
        flat = bins[l].ravel()  # [U] (-1 = empty)
        held = np.where(flat >= 0, flat, 0)
        w = np.where(flat >= 0, 1.0 / counts[l, held], 0.0)  # [U]
        unit_pairs = t.coactivation[l][np.ix_(held, held)] * w[:, None] * w[None, :]  # [U, U]
        pairs[l] = unit_pairs.reshape(G, P, G, P).sum(axis=(1, 3))
    self_pairs = 0.5 * np.diagonal(pairs, axis1=1, axis2=2).copy()
    idx = np.arange(G)
    pairs[:, idx, idx] = 0.0
    return bin_load, self_pairs, pairs


def _assign_nodes(problem: Problem, bin_load: np.ndarray, self_pairs: np.ndarray, bin_pairs: np.ndarray) -> np.ndarray:
    """Node of every bin, all layers at once, heaviest bin first.

    Parameters:
        bin_load, self_pairs: [L, G]; bin_pairs: [L, G, G] (from `_bin_traffic`)
    Returns:
        node_of_bin: [L, G]
    """
    topo = problem.topology
    L, G = bin_load.shape
    N, K = topo.nodes, problem.routed.top_k
    sigma = topo.node_sizes / G  # [N] share of the sources on each node
    rows = np.arange(L)
    order = np.argsort(-bin_load, axis=1, kind="stable")  # [L, G]
    copies = np.zeros((L, N))  # copies bound for each node
    pairs = np.zeros((L, N))  # pairs of one token's copies both bound for the node
    free = np.tile(topo.node_sizes, (L, 1))  # [L, N] devices left
    pull = np.zeros((L, G, N))  # pairs between bin b and the bins already on node n
    node_of_bin = np.empty((L, G), dtype=np.int64)
    for i in range(G):
        b = order[:, i]  # [L]
        # Step 1: each node's InfiniBand in-port after taking the bin
        after_copies = copies + bin_load[rows, b][:, None]
        after_pairs = pairs + pull[rows, b] + self_pairs[rows, b][:, None]  # [L, N]
        crossing = np.maximum(after_copies - after_pairs, after_copies / K)
        # Step 2: the lightest node with a free device takes it
        n = np.argmin(np.where(free > 0, (1 - sigma[None, :]) * crossing, np.inf), axis=1)  # [L]
        node_of_bin[rows, b] = n
        copies[rows, n] = after_copies[rows, n]
        pairs[rows, n] = after_pairs[rows, n]
        free[rows, n] -= 1
        pull[rows, :, n] += bin_pairs[rows, :, b]
    return node_of_bin


def _refine_nodes(problem: Problem, bin_load: np.ndarray, self_pairs: np.ndarray, bin_pairs: np.ndarray,
                  node_of_bin: np.ndarray, rounds: int, tolerance: float = 0.0) -> np.ndarray:
    """Swap a bin of the node with the busiest InfiniBand port with a bin elsewhere, the swap
    that lowers the busier of the two nodes most, while one does (at most `rounds` per layer).

    Parameters:
        bin_load, self_pairs: [L, G]; bin_pairs: [L, G, G]; node_of_bin: [L, G]
        tolerance: if > 0, stop once the busiest port is within this share of an even spread's
    Returns:
        node_of_bin: [L, G] refined
    """
    topo = problem.topology
    N, K = topo.nodes, problem.routed.top_k
    if N == 1 or rounds <= 0:
        return node_of_bin
    out = node_of_bin.copy()
    sigma = topo.node_sizes / topo.devices  # [N] share of the sources on each node
    for l in range(len(out)):
        a, s, pair, nodes = bin_load[l], self_pairs[l], bin_pairs[l], out[l]
        # Step 1: each bin's pull to each node, node sums
        onehot = np.zeros((len(a), N))
        onehot[np.arange(len(a)), nodes] = 1.0
        pull = pair @ onehot  # [G, N]
        copies = np.bincount(nodes, weights=a, minlength=N)  # [N]
        pairs = 0.5 * (pull * onehot).sum(axis=0) + np.bincount(nodes, weights=s, minlength=N)  # [N]
        for _ in range(rounds):
            # Step 2: every swap of a bin u on the busiest node i with a bin v on node j != i
            crossing = np.maximum(copies - pairs, copies / K)  # [N]
            ports = _port_load(crossing, crossing.sum(), sigma)
            i = int(ports.argmax())
            if tolerance > 0:  # stop near the ports of an even spread
                even = crossing.sum() * sigma
                if ports[i] <= _port_load(even, crossing.sum(), sigma).max() * (1 + tolerance):
                    break
            us, vs = np.nonzero(nodes == i)[0], np.nonzero(nodes != i)[0]
            j = nodes[vs]  # [V]
            du, dv = a[us][:, None], a[vs][None, :]
            su, sv = s[us][:, None], s[vs][None, :]
            cross = pair[np.ix_(us, vs)]  # [Ui, V]
            ci, cj = copies[i] - du + dv, copies[j][None, :] - dv + du
            pi = pairs[i] - pull[us, i][:, None] - su + pull[vs, i][None, :] - cross + sv
            pj = pairs[j][None, :] - pull[vs, j][None, :] - sv + pull[us][:, j] - cross + su
            xi, xj = np.maximum(ci - pi, ci / K), np.maximum(cj - pj, cj / K)  # [Ui, V] crossing after
            total = crossing.sum() - crossing[i] - crossing[j][None, :] + xi + xj
            worst = np.maximum(_port_load(xi, total, sigma[i]), _port_load(xj, total, sigma[j][None, :]))
            best = np.unravel_index(int(worst.argmin()), worst.shape)
            if not worst[best] < ports[i] * (1 - _RELATIVE_GAIN):
                break
            # Step 3: apply it, updating the sums incrementally
            u, v, jn = int(us[best[0]]), int(vs[best[1]]), int(j[best[1]])
            copies[i], copies[jn] = ci[best], cj[best]
            pairs[i], pairs[jn] = pi[best], pj[best]
            pull[:, i] += pair[:, v] - pair[:, u]
            pull[:, jn] += pair[:, u] - pair[:, v]
            nodes[u], nodes[v] = jn, i
    return out


def _port_load(crossing: np.ndarray, total: np.ndarray | float, sigma: np.ndarray) -> np.ndarray:
    """A node's busier InfiniBand port with sources spread evenly: in = (1 - sigma) x the tokens
    crossing into it, out = sigma x the tokens crossing into the other nodes."""
    return np.maximum((1 - sigma) * crossing, sigma * (total - crossing))


def _align(slots: np.ndarray, now: np.ndarray, topo: Topology, num_experts: int) -> np.ndarray:
    """Relabel nodes of equal size, then devices inside each node, so that as many (device,
    expert) pairs as possible are already in place; greedy matching by overlap.

    Parameters:
        slots: [L, G, P] proposed; now: [L, G, P'] current
    Returns:
        [L, G, P] the proposed placement with relabelled nodes and devices
    """
    first = np.concatenate([[0], np.cumsum(topo.node_sizes)])
    out = np.empty_like(slots)
    for l in range(len(slots)):
        new_dev = _device_counts(slots[l], num_experts)  # [G, E]
        old_dev = _device_counts(now[l], num_experts)
        new_node = np.add.reduceat(new_dev, first[:-1], axis=0)  # [N, E]
        old_node = np.add.reduceat(old_dev, first[:-1], axis=0)
        # Step 1: node -> node (equal sizes only), most experts in common first
        overlap = np.minimum(new_node[:, None, :], old_node[None, :, :]).sum(axis=2)  # [N, N]
        same = topo.node_sizes[:, None] == topo.node_sizes[None, :]
        node_to = _greedy_match(np.where(same, overlap, -1))
        # Step 2: device -> device inside each matched pair of nodes
        for n, m in enumerate(node_to):
            src = np.arange(first[n], first[n + 1])
            dst = np.arange(first[m], first[m + 1])
            common = new_dev[src] @ old_dev[dst].T  # [D, D] experts in common
            out[l, dst[_greedy_match(common)]] = slots[l, src]
    return out


def _rotate(slots: np.ndarray, topo: Topology) -> np.ndarray:
    """Layer l: full node n's contents move to full node (n + l) mod N_full, and inside every
    node device i's to device (i + l) mod size. Loads move with the contents."""
    L = slots.shape[0]
    sizes, first = topo.node_sizes, np.concatenate([[0], np.cumsum(topo.node_sizes)])
    full = int((sizes == topo.devices_per_node).sum())
    out = np.empty_like(slots)
    node, local = topo.node_of, topo.local_of
    for l in range(L):
        to_node = np.where(node < full, (node + l) % max(full, 1), node)
        to = first[to_node] + (local + l) % sizes[to_node]  # [G] where device g's contents go
        out[l, to] = slots[l]
    return out


def _device_counts(slots_layer: np.ndarray, num_experts: int) -> np.ndarray:
    """[G, P] -> [G, E] copies of each expert on each device (0 or 1)."""
    G = slots_layer.shape[0]
    out = np.zeros((G, num_experts + 1), dtype=np.int64)
    experts = np.where(slots_layer >= 0, slots_layer, num_experts).ravel()  # empty slots count in a spare column
    np.add.at(out, (np.repeat(np.arange(G), slots_layer.shape[1]), experts), 1)
    return out[:, :num_experts]


def _greedy_match(score: np.ndarray) -> np.ndarray:
    """[n, n] score (-1 = forbidden) -> a permutation: row i goes to column out[i], best scores first."""
    n = score.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    used_rows, used_cols = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for flat in np.argsort(-score, axis=None, kind="stable"):
        i, j = divmod(int(flat), n)
        if not used_rows[i] and not used_cols[j] and score[i, j] >= 0:
            out[i] = j
            used_rows[i] = used_cols[j] = True
    assert (out >= 0).all(), "no full matching"
    return out
