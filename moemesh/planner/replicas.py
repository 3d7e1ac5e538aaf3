"""Redundant experts, EPLB-style: how many replicas each expert gets, and packing them. Pure numpy.

`replicate` is DeepSeek EPLB's `replicate_experts`: give the next replica to the expert with the
highest load per replica, until the spare slots are full; splitting an expert's tokens evenly
over its replicas (what the transport does), this minimises the largest load per replica.
`pack` is EPLB's `balanced_packing` with the rule that a bin never holds two replicas of one
expert: heaviest item first, into the lightest bin with room; `improve_pack` then swaps items
out of the heaviest bin while that helps (greedy packing with a fixed count per bin leaves the
last, forced items uneven).
"""

from __future__ import annotations

import numpy as np


def replicate(load: np.ndarray, slots: int, max_replicas: int) -> np.ndarray:
    """Replica counts that minimise the largest load per replica.

    Parameters:
        load: [L, E] token copies per expert
        slots: replicas to place per layer (>= E)
        max_replicas: most replicas one expert may have (devices: one replica per device)
    Returns:
        counts: [L, E] int64 replicas per expert, >= 1, summing to min(slots, E x max_replicas)
    """
    L, E = load.shape
    assert slots >= E, "fewer slots than experts"
    counts = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    # Step 1: one replica more for the expert with the highest load per replica, per spare slot
    for _ in range(min(slots, E * max_replicas) - E):
        per_replica = np.where(counts < max_replicas, load / counts, -np.inf)  # [L, E]
        counts[rows, per_replica.argmax(axis=1)] += 1
    return counts


def units(load: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand replica counts into units (one per replica), heaviest first.

    Parameters:
        load: [L, E]; counts: [L, E] from `replicate` (every layer the same total U)
    Returns:
        unit_expert: [L, U] expert of each unit; unit_load: [L, U] load / replicas, descending
    """
    L, E = load.shape
    U = int(counts[0].sum())
    unit_expert = np.stack([np.repeat(np.arange(E), counts[l]) for l in range(L)])  # [L, U]
    unit_load = np.take_along_axis(load / counts, unit_expert, axis=1)  # [L, U]
    order = np.argsort(-unit_load, axis=1, kind="stable")
    assert unit_expert.shape == (L, U)
    return np.take_along_axis(unit_expert, order, axis=1), np.take_along_axis(unit_load, order, axis=1)


def pack(unit_expert: np.ndarray, unit_load: np.ndarray, bins: int, capacity: int) -> np.ndarray:
    """Greedy balanced packing of one group of units into `bins` bins of `capacity` slots.

    Parameters:
        unit_expert, unit_load: [U] heaviest first
    Returns:
        bin_of: [U] bin index per unit; no bin gets two units of one expert
    """
    U = len(unit_expert)
    assert U <= bins * capacity, "more units than slots"
    load = np.zeros(bins)
    fill = np.zeros(bins, dtype=np.int64)
    taken: list[set[int]] = [set() for _ in range(bins)]
    bin_of = np.full(U, -1, dtype=np.int64)
    for u in range(U):
        e = int(unit_expert[u])
        # Step 1: bins with a free slot that do not hold this expert yet
        allowed = [b for b in range(bins) if fill[b] < capacity and e not in taken[b]]
        assert allowed, "no bin can take the unit"
        # Step 2: the lightest of them
        best = min(allowed, key=load.__getitem__)
        bin_of[u] = best
        load[best] += unit_load[u]
        fill[best] += 1
        taken[best].add(e)
    return bin_of


def improve_pack(unit_expert: np.ndarray, unit_load: np.ndarray, bin_of: np.ndarray, bins: int,
                 rounds: int) -> np.ndarray:
    """Swap a unit of the heaviest bin with a unit of another bin while that lowers the heavier
    of the two (fixes what greedy packing with a slot count per bin leaves uneven).

    Parameters:
        unit_expert, unit_load, bin_of: [U]
    Returns:
        bin_of: [U] improved; still no bin with two units of one expert
    """
    bin_of = bin_of.copy()
    E = int(unit_expert.max()) + 1 if len(unit_expert) else 0
    load = np.bincount(bin_of, weights=unit_load, minlength=bins)
    count = np.zeros((bins, E), dtype=np.int64)  # units of expert e in bin b
    np.add.at(count, (bin_of, unit_expert), 1)
    for _ in range(rounds):
        # Step 1: every swap of a unit u of the heaviest bin b with a unit v elsewhere
        b = int(load.argmax())
        us, vs = np.nonzero(bin_of == b)[0], np.nonzero(bin_of != b)[0]
        if not len(us) or not len(vs):
            break
        j = bin_of[vs]
        au, av = unit_load[us][:, None], unit_load[vs][None, :]
        worst = np.maximum(load[b] - au + av, load[j][None, :] - av + au)  # [Ub, V]
        # Step 2: legal swaps: the experts differ and neither bin holds the incoming one already
        eu, ev = unit_expert[us][:, None], unit_expert[vs][None, :]
        legal = (eu != ev) & (count[j[None, :], eu] == 0) & (count[b, ev] == 0)
        worst = np.where(legal, worst, np.inf)
        best = np.unravel_index(int(worst.argmin()), worst.shape)
        if not worst[best] < load[b] * (1 - 1e-9):
            break
        # Step 3: apply it
        u, v, jb = int(us[best[0]]), int(vs[best[1]]), int(j[best[1]])
        load[b] += unit_load[v] - unit_load[u]
        load[jb] += unit_load[u] - unit_load[v]
        count[b, unit_expert[u]] -= 1
        count[b, unit_expert[v]] += 1
        count[jb, unit_expert[v]] -= 1
        count[jb, unit_expert[u]] += 1
        bin_of[u], bin_of[v] = jb, b
    return bin_of
