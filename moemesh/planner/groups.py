"""Group-limited routing (DeepSeek-V3) and the nodes a token reaches. Pure: numpy and math.

Shape legend: E routed experts, K top-k, n expert groups (n_group, group g = experts
[g E/n, (g+1) E/n)), k groups a token may use (topk_group), N nodes, G devices, P slots per device.

DeepSeek-V3's router keeps, per token, the k groups with the best sums of their two best scores
and picks its K experts inside them, so a token's experts span at most k groups. With the
send-once-per-node dispatch (DeepEP; moemesh.planner.cost's dedupe_per_node) a token crosses the
InfiniBand once per node other than its own that holds one of its experts: the bytes leaving a
node are (distinct remote nodes per token) x D x dtype bytes per exchange. When each group lives
on as few nodes as possible (`aligned_slots`: n groups on N <= n nodes, n / N groups per node; or
one group on N / n nodes) a token reaches at most k x max(1, N / n) nodes; spread over the nodes,
a group's experts reach up to K nodes again.

Two ways to count, for routing that favours no expert (i.i.d. scores):
- `expected_remote_nodes`, exact combinatorics under the *uniform model*: the k kept groups are
  a uniform k-subset of the n groups (exact, by symmetry) and the K experts a uniform K-subset of
  the kept groups' experts. Without a limit (k = n) that is exactly top-K of i.i.d. scores. With
  one, it is a model: the router keeps groups whose two best scores are high, so a kept group
  nearly always gives the token one of its experts, and tokens spread over their kept groups
  more than uniformly (DeepSeek-V3, 8 aligned nodes: 3.18 remote nodes per token by the model,
  3.47 by the router).
- `sampled_remote_nodes`: the router itself (`route`: DeepSeek-V3's group choice, then top-K)
  on seeded i.i.d. scores, counted by `remote_nodes` (exact for the routes it is given: a
  measured trace's routes may be passed the same way).
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from moemesh.errors import ConfigError

MAX_SUBSETS = 200_000  # kept-group subsets enumerated exactly (DeepSeek-V3: C(8, 4) = 70)


def expected_remote_nodes(node_of_expert: np.ndarray, top_k: int, n_group: int, topk_group: int,
                          source_share: np.ndarray) -> float:
    """Expected number of distinct nodes, other than the token's own, holding one of its K experts.

    Parameters:
        node_of_expert: [E] node of each expert (where the token's copy goes)
        top_k: K; n_group, topk_group: the group limit (topk_group = n_group: none)
        source_share: [N] share of the tokens whose source device is on each node (sums to 1)
    Returns:
        sum over nodes m of P(the token reaches m) x (1 - source_share[m])
    """
    nodes = np.asarray(node_of_expert, dtype=np.int64)  # (E,)
    share = np.asarray(source_share, dtype=np.float64)  # (N,)
    E, N = len(nodes), len(share)
    check_group_limit(E, top_k, n_group, topk_group)
    if math.comb(n_group, topk_group) > MAX_SUBSETS:
        raise ConfigError(f"{n_group} groups choose {topk_group}: too many subsets to enumerate")
    # Step 1: experts of each group on each node
    per_group = np.zeros((n_group, N), dtype=np.int64)
    np.add.at(per_group, (np.arange(E) // (E // n_group), nodes), 1)  # (n, N)
    # Step 2: per kept-group subset S, P(no expert on node m) = C(M - m_S, K) / C(M, K)
    subsets = np.array(list(combinations(range(n_group), topk_group)))  # (C, k)
    on_node = per_group[subsets].sum(axis=1)  # (C, N)
    M = topk_group * (E // n_group)
    miss = np.vectorize(lambda x: math.comb(M - int(x), top_k))(on_node) / math.comb(M, top_k)  # (C, N)
    # Step 3: every subset equally likely; the token's own node does not count
    reach = 1.0 - miss.mean(axis=0)  # (N,)
    return float((reach * (1.0 - share)).sum())


def limit_to_groups(scores: np.ndarray, n_group: int, kept: int) -> np.ndarray:
    """scores [T, E] -> the same with every expert outside each token's `kept` best groups at -inf
    (DeepSeek-V3's group choice: a group's score is the sum of its two best experts' scores)."""
    T, E = scores.shape
    grouped = scores.reshape(T, n_group, E // n_group)  # (T, n, E/n)
    best_two = -np.partition(-grouped, 1, axis=2)[:, :, :2].sum(axis=2)  # (T, n)
    chosen = np.argpartition(-best_two, kept - 1, axis=1)[:, :kept]  # (T, k)
    keep = np.zeros((T, n_group), dtype=bool)
    np.put_along_axis(keep, chosen, True, axis=1)  # (T, n)
    return np.where(np.repeat(keep, E // n_group, axis=1), scores, -np.inf)  # (T, E)


def route(scores: np.ndarray, top_k: int, group_limit: tuple[int, int] | None = None) -> np.ndarray:
    """scores [T, E] -> experts [T, K]: top-K, inside the kept groups when `group_limit` =
    (n_group, topk_group) is given."""
    if group_limit is not None:
        scores = limit_to_groups(scores, *group_limit)
    return np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]  # (T, K)


def remote_nodes(experts: np.ndarray, node_of_expert: np.ndarray, source_share: np.ndarray) -> float:
    """Mean over the tokens of experts [T, K] of the distinct nodes, other than the token's own,
    holding one of its experts; the token's own node is node m with probability source_share[m]."""
    nodes = np.asarray(node_of_expert)[experts]  # (T, K)
    share = np.asarray(source_share, dtype=np.float64)  # (N,)
    hit = np.zeros((len(nodes), len(share)), dtype=bool)  # (T, N)
    np.put_along_axis(hit, nodes, True, axis=1)
    return float((hit @ (1.0 - share)).mean()) if len(nodes) else 0.0


def sampled_remote_nodes(node_of_expert: np.ndarray, top_k: int, group_limit: tuple[int, int] | None,
                         source_share: np.ndarray, tokens: int = 8192, seed: int = 0) -> float:
    """`remote_nodes` of `tokens` tokens the router sends on i.i.d. Gumbel scores (seeded, so
    the same scores for every layout and limit compared)."""
    scores = np.random.default_rng(seed).gumbel(size=(tokens, len(node_of_expert)))  # (T, E)
    return remote_nodes(route(scores, top_k, group_limit), node_of_expert, source_share)


def check_group_limit(E: int, top_k: int, n_group: int, topk_group: int) -> None:
    """ConfigError unless n_group groups split E experts and K experts fit in topk_group groups."""
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ConfigError(f"{E} experts in {n_group} groups, {topk_group} kept: groups must split the experts "
                          "and 1 <= topk_group <= n_group")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ConfigError(f"top_k={top_k} must be in 1..{topk_group * (E // n_group)} (the kept groups' experts)")


def aligned_nodes(num_experts: int, nodes: int) -> np.ndarray:
    """[E] node of each expert when experts lie in contiguous blocks, node by node (what
    `aligned_slots` does): groups, contiguous too, sit whole on nodes when E / N is a multiple of
    the group size, and each on N / n whole nodes when N is a multiple of n."""
    return np.arange(num_experts) * nodes // num_experts


def spread_nodes(num_experts: int, nodes: int) -> np.ndarray:
    """[E] node of each expert dealt out in turn (expert e on node e mod N): every group on as
    many nodes as it has experts, the layout that ignores groups."""
    return np.arange(num_experts) % nodes


def aligned_slots(num_experts: int, devices: int, slots: int, layers: int) -> np.ndarray:
    """[L, G, P] contiguous blocks: with G <= E device g holds experts [g P, (g + 1) P) (< E);
    with G > E device g holds a replica of expert g E // G, so an expert's replicas are neighbours
    (one node while G / E <= devices per node). Devices are numbered node by node, so nodes hold
    contiguous experts too: the placement that aligns groups with nodes (`aligned_nodes`)."""
    E, G, P = num_experts, devices, slots
    if G > E:
        table = (np.arange(G) * E // G)[:, None]  # (G, 1)
    else:
        table = np.arange(G * P).reshape(G, P)  # (G, P)
        table = np.where(table < E, table, -1)
    return np.repeat(table[None], layers, axis=0)  # (L, G, P)


def nodes_bound(n_group: int, topk_group: int, nodes: int, top_k: int) -> int:
    """The most nodes a token reaches with groups aligned: k groups on max(1, N / n) nodes each,
    never more than K or N."""
    return min(topk_group * max(1, nodes // n_group), top_k, nodes)
