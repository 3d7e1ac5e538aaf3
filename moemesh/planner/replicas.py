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
        load: [L, E]; counts: [L, E] replicas per expert (layers may differ in total)
    Returns:
        unit_expert: [L, U] expert of each unit, -1 pads layers with fewer units (at the end);
        unit_load: [L, U] load / replicas, descending, 0 for padding
    """
    L, E = load.shape
    U = int(counts.sum(axis=1).max())
    unit_expert = np.full((L, U), -1, dtype=np.int64)
    unit_load = np.zeros((L, U))
    for l in range(L):
        experts = np.repeat(np.arange(E), counts[l])
        per = load[l, experts] / counts[l, experts]
        order = np.argsort(-per, kind="stable")
        unit_expert[l, : len(experts)] = experts[order]
        unit_load[l, : len(experts)] = per[order]
    return unit_expert, unit_load


def pack(unit_expert: np.ndarray, unit_load: np.ndarray, bins: int, capacity: int) -> np.ndarray:
    """Greedy balanced packing of units into `bins` bins of `capacity` slots, all layers at once.

    Parameters:
        unit_expert, unit_load: [L, U] heaviest first (-1 = padding), at most bins x capacity real
    Returns:
        bin_of: [L, U] bin of each unit (-1 for padding); no bin gets two units of one expert
    """
    L, U = unit_expert.shape
    assert ((unit_expert >= 0).sum(axis=1) <= bins * capacity).all(), "more units than slots"
    E = int(unit_expert.max()) + 1
    rows = np.arange(L)
    load = np.zeros((L, bins))
    fill = np.zeros((L, bins), dtype=np.int64)
    has = np.zeros((L, bins, E), dtype=bool)
    bin_of = np.empty((L, U), dtype=np.int64)
    for u in range(U):
        e = unit_expert[:, u]  # [L]
        real = e >= 0  # [L] padding units go nowhere
        # Step 1: bins with a free slot that do not hold this expert yet
        allowed = (fill < capacity) & ~has[rows, :, np.maximum(e, 0)]  # [L, bins]
        assert allowed[real].any(axis=1).all(), "no bin can take the unit"
        # Step 2: the lightest of them
        b = np.argmin(np.where(allowed, load, np.inf), axis=1)  # [L]
        r, b = rows[real], b[real]
        bin_of[:, u] = -1
        bin_of[r, u] = b
        load[r, b] += unit_load[r, u]
        fill[r, b] += 1
        has[r, b, e[real]] = True
    return bin_of


def improve_pack(unit_expert: np.ndarray, unit_load: np.ndarray, bin_of: np.ndarray, bins: int,
                 rounds: int, tolerance: float = 0.0) -> np.ndarray:
    """Swap a unit of the heaviest bin with a unit of another bin while that lowers the heavier
    of the two (fixes what greedy packing with a slot count per bin leaves uneven).

    Parameters:
        unit_expert, unit_load, bin_of: [U]
        tolerance: stop once the heaviest bin is within this share of the mean (fewer moves)
    Returns:
        bin_of: [U] improved; still no bin with two units of one expert
    """
    real = unit_expert >= 0  # padding units (-1) stay out
    if not real.all():
        out = bin_of.copy()
        out[real] = improve_pack(unit_expert[real], unit_load[real], bin_of[real], bins, rounds, tolerance)
        return out
    bin_of = bin_of.copy()
    E = int(unit_expert.max()) + 1 if len(unit_expert) else 0
    load = np.bincount(bin_of, weights=unit_load, minlength=bins)
    count = np.zeros((bins, E), dtype=np.int64)  # units of expert e in bin b
    np.add.at(count, (bin_of, unit_expert), 1)
    for _ in range(rounds):
        # Step 1: every swap of a unit u of the heaviest bin b with a unit v elsewhere
        b = int(load.argmax())
        us, vs = np.nonzero(bin_of == b)[0], np.nonzero(bin_of != b)[0]
        if not len(us) or not len(vs) or load[b] <= load.mean() * (1 + tolerance):
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
