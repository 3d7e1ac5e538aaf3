"""Traffic: the expected routing the planner places experts for. Pure: numpy, no torch.distributed.

Per MoE layer, two matrices describe one batch of tokens (a step, or a measured window):

    tokens[l, s, e]        token copies source rank s routes to expert e   [L, S, E]
    coactivation[l, e, f]  tokens routed to both e and f (symmetric, 0 on the diagonal)  [L, E, E]

Three sources:
- `synthetic`: Zipf-skewed expert popularity (a fresh random ranking per layer, seeded), optional
  co-activation clusters, optional group-limited routing (DeepSeek-V3's), tokens spread evenly over
  the source ranks; drawn by sampling top-k sets, so inclusion probabilities never exceed 1 and
  co-activation is consistent with counts.
- `from_counts`: the coordinator's load window (int64 [moe_layers, experts], or [sources,
  moe_layers, experts] per source); without per-source data, tokens are spread evenly over
  sources; without co-activation, experts are assumed to co-fire independently.
- trace files (JSON, below) that a running mesh dumps (`save_trace`) and `moemesh plan --trace` reads.

Trace format, version 1:

    {"format": "moemesh-trace", "version": 1, "top_k": 2, "num_experts": 4, "sources": 2,
     "layers": [{"layer": 0,
                 "tokens": [[3, 0, 1, 4], [2, 2, 0, 1]],    # [S][E] per source, or
                 "expert_tokens": [5, 2, 1, 5],             # [E] totals (spread evenly)
                 "coactivation": [[0, 3, 2.0], ...]}]}      # optional [e, f, tokens], e < f
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from moemesh.errors import InvalidRequestError, read_text
from moemesh.planner.groups import check_group_limit, limit_to_groups

TRACE_FORMAT = "moemesh-trace"
TRACE_VERSION = 1


@dataclass(frozen=True)
class Traffic:
    """Expected routing of one batch of tokens (shapes in the module docstring)."""

    layer_ids: tuple[int, ...]  # (L,) model layer index of each MoE layer
    tokens: np.ndarray  # [L, S, E] float64 token copies source s -> expert e
    coactivation: np.ndarray  # [L, E, E] float64 tokens routed to both e and f
    top_k: int  # K
    origin: str = "synthetic"

    def __post_init__(self) -> None:
        L, _, E = self.tokens.shape  # (L, S, E)
        assert len(self.layer_ids) == L and self.coactivation.shape == (L, E, E) and self.top_k >= 1

    @property
    def num_layers(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_sources(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_experts(self) -> int:
        return self.tokens.shape[2]

    @property
    def expert_tokens(self) -> np.ndarray:
        """[L, E] token copies per expert (summed over sources)."""
        return self.tokens.sum(axis=1)

    @property
    def tokens_per_layer(self) -> np.ndarray:
        """[L] tokens (not copies) each layer routes: copies / K."""
        return self.tokens.sum(axis=(1, 2)) / self.top_k

    def with_sources(self, sources: int) -> Traffic:
        """The same routing from `sources` ranks: kept as is when the count matches, else each
        expert's total is spread evenly over the new sources."""
        if sources == self.num_sources:
            return self
        spread = np.repeat(self.expert_tokens[:, None, :] / sources, sources, axis=1)  # [L, S', E]
        return replace(self, tokens=spread)

    def scaled(self, factor: float) -> Traffic:
        """Every count multiplied by `factor` (a bigger or smaller batch of the same routing)."""
        return replace(self, tokens=self.tokens * factor, coactivation=self.coactivation * factor)


# ---------------------------------------------------------------------------------------------
# Synthetic routing


@dataclass(frozen=True)
class Skew:
    """`zipf:S[,groups:N][,affinity:A]`: expert popularity ~ 1 / rank^S; with groups > 1 every
    token belongs to one of N random expert clusters whose experts are A times likelier."""

    zipf: float = 1.2
    groups: int = 0
    affinity: float = 1.0

    def __str__(self) -> str:
        extra = f",groups:{self.groups},affinity:{self.affinity:g}" if self.groups > 1 else ""
        return f"zipf:{self.zipf:g}{extra}"


def parse_skew(spec: str) -> Skew:
    """Parse `zipf:1.2`, `uniform`, `zipf:1.2,groups:8,affinity:4`; InvalidRequestError otherwise."""
    values: dict[str, float] = {}
    for part in spec.split(","):
        key, _, raw = part.strip().partition(":")
        if key == "uniform" and not raw:
            values["zipf"] = 0.0
            continue
        if key not in ("zipf", "groups", "affinity") or not raw:
            raise InvalidRequestError(f"skew {spec!r}: expected zipf:S[,groups:N][,affinity:A] or uniform")
        try:
            values[key] = float(raw)
        except ValueError:
            raise InvalidRequestError(f"skew {spec!r}: {key} wants a number, got {raw!r}") from None
    if "zipf" not in values or values["zipf"] < 0:
        raise InvalidRequestError(f"skew {spec!r}: needs zipf:S with S >= 0")
    groups = values.get("groups", 0)
    if groups < 0 or groups != int(groups):
        raise InvalidRequestError(f"skew {spec!r}: groups must be a non-negative integer")
    if values.get("affinity", 1.0) < 1:
        raise InvalidRequestError(f"skew {spec!r}: affinity must be >= 1")
    return Skew(zipf=values["zipf"], groups=int(groups), affinity=values.get("affinity", 1.0))


def synthetic(
    num_experts: int,
    layers: int | Sequence[int],
    sources: int,
    top_k: int = 2,
    skew: Skew | float = 1.2,
    tokens_per_source: float = 256,
    seed: int = 0,
    sample_tokens: int = 2048,
    group_limit: tuple[int, int] | None = None,
) -> Traffic:
    """Skewed routing for `layers` (a count or MoE layer ids), spread evenly over `sources`.

    Parameters:
        skew: Skew or a Zipf exponent; each layer ranks its experts by a fresh random permutation
        tokens_per_source: tokens each source routes per layer (the batch the cost model prices)
        sample_tokens: top-k sets drawn per layer to estimate counts and co-activation
        group_limit: (n_group, topk_group): experts in n_group contiguous groups, a token's top-k
            drawn from the topk_group groups with the highest sum of their two best scores
    Returns:
        Traffic with tokens [L, sources, E] and coactivation [L, E, E], scaled to the batch
    """
    skew = skew if isinstance(skew, Skew) else Skew(zipf=float(skew))
    layer_ids = tuple(range(layers)) if isinstance(layers, int) else tuple(layers)
    if not 1 <= top_k <= num_experts:
        raise InvalidRequestError(f"top_k must be in 1..{num_experts}, got {top_k}")
    if group_limit is not None:
        check_group_limit(num_experts, top_k, *group_limit)
    rng = np.random.default_rng(seed)
    L, E, T = len(layer_ids), num_experts, sample_tokens
    counts = np.zeros((L, E))
    coact = np.zeros((L, E, E))
    for l in range(L):
        # Step 1: popularity ~ 1 / rank^s with a random ranking of the experts
        rank = rng.permutation(E)
        logits = (-skew.zipf * np.log1p(rank)).astype(np.float32)  # [E]
        scores = np.broadcast_to(logits, (T, E)) + rng.gumbel(size=(T, E)).astype(np.float32)  # [T, E]
        # Step 2: co-activation clusters: a token's cluster makes its experts `affinity` x likelier
        if skew.groups > 1:
            cluster_of = rng.permutation(E) % skew.groups  # [E]
            token_cluster = rng.integers(skew.groups, size=T)  # [T]
            scores += np.float32(math.log(skew.affinity)) * (cluster_of[None, :] == token_cluster[:, None])
        if group_limit is not None:
            scores = limit_to_groups(scores, *group_limit)
        # Step 3: top-k by Gumbel-max sampling without replacement; count experts and pairs
        top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]  # [T, K]
        counts[l] = np.bincount(top.ravel(), minlength=E)
        coact[l] = _pair_counts(top, E)
    scale = tokens_per_source * sources / T
    tokens = np.repeat(counts[:, None, :] * scale / sources, sources, axis=1)  # [L, S, E]
    return Traffic(layer_ids=layer_ids, tokens=tokens, coactivation=coact * scale, top_k=top_k,
                   origin=f"synthetic {skew} seed {seed}")


def _pair_counts(top: np.ndarray, num_experts: int) -> np.ndarray:
    """top: [T, K] experts of each token -> [E, E] symmetric count of tokens per expert pair."""
    E = num_experts
    K = top.shape[1]
    flat = np.zeros(E * E)
    for i in range(K):
        for j in range(i + 1, K):
            flat += np.bincount(top[:, i] * E + top[:, j], minlength=E * E)
    pairs = flat.reshape(E, E)
    return pairs + pairs.T


def shifted(traffic: Traffic, fraction: float, seed: int = 0) -> Traffic:
    """Traffic after a drift: in every layer a random `fraction` of the experts trade identities
    (their rows of popularity and co-activation move to other expert ids)."""
    rng = np.random.default_rng(seed)
    L, _, E = traffic.tokens.shape
    tokens = traffic.tokens.copy()
    coact = traffic.coactivation.copy()
    moved = max(2, round(fraction * E)) if fraction > 0 else 0
    for l in range(L):
        perm = np.arange(E)
        chosen = rng.choice(E, size=min(moved, E), replace=False)
        perm[chosen] = rng.permutation(chosen)
        tokens[l] = traffic.tokens[l][:, perm]
        coact[l] = traffic.coactivation[l][np.ix_(perm, perm)]
    return replace(traffic, tokens=tokens, coactivation=coact, origin=f"{traffic.origin} shifted {fraction:g}")


# ---------------------------------------------------------------------------------------------
# Measured routing


def from_counts(
    counts: Any,
    top_k: int,
    sources: int | None = None,
    layer_ids: Sequence[int] | None = None,
    coactivation: Any = None,
    origin: str = "measured",
) -> Traffic:
    """Traffic from measured counts (numpy or torch).

    Parameters:
        counts: [L, E] token copies per (MoE layer, expert) — the coordinator's load window — or
            [S, L, E] per source rank
        sources: ranks to spread [L, E] counts over evenly (required for [L, E] input)
        coactivation: [L, E, E] measured pair counts; default: experts co-fire independently
    """
    c = np.asarray(counts.numpy() if hasattr(counts, "numpy") else counts, dtype=np.float64)
    if c.ndim == 2:
        if sources is None or sources < 1:
            raise InvalidRequestError("counts [layers, experts] need sources >= 1 to spread over")
        tokens = np.repeat(c[:, None, :] / sources, sources, axis=1)  # [L, S, E]
    elif c.ndim == 3:
        tokens = c.transpose(1, 0, 2).copy()  # [S, L, E] -> [L, S, E]
    else:
        raise InvalidRequestError(
            f"counts must be [layers, experts] or [sources, layers, experts], got {list(c.shape)}")
    if c.size and c.min() < 0:
        raise InvalidRequestError("counts must be non-negative")
    L, _, E = tokens.shape
    if not 1 <= top_k <= max(E, 1):
        raise InvalidRequestError(f"top_k must be in 1..{E}, got {top_k}")
    ids = tuple(range(L)) if layer_ids is None else tuple(int(i) for i in layer_ids)
    if len(ids) != L:
        raise InvalidRequestError(f"{len(ids)} layer ids for {L} layers of counts")
    if coactivation is None:
        coact = independent_coactivation(tokens.sum(axis=1), top_k)
    else:
        coact = np.asarray(coactivation.numpy() if hasattr(coactivation, "numpy") else coactivation, dtype=np.float64)
        if coact.shape != (L, E, E):
            raise InvalidRequestError(f"coactivation must be [{L}, {E}, {E}], got {list(coact.shape)}")
    return Traffic(layer_ids=ids, tokens=tokens, coactivation=coact, top_k=top_k, origin=origin)


def independent_coactivation(expert_tokens: np.ndarray, top_k: int) -> np.ndarray:
    """[L, E] copies per expert -> [L, E, E] pair counts if experts co-fired independently:
    c_ef = (K-1) n_e n_f / (N - sum n^2 / N), N = sum n, which makes the pairs add up to the
    (K-1) N / 2 pairs the N / K tokens really have."""
    n = np.asarray(expert_tokens, dtype=np.float64)
    total = n.sum(axis=1, keepdims=True)  # [L, 1]
    denom = np.maximum(total - (n**2).sum(axis=1, keepdims=True) / np.maximum(total, 1e-12), 1e-12)
    coact = (top_k - 1) * n[:, :, None] * n[:, None, :] / denom[:, :, None]  # [L, E, E]
    idx = np.arange(n.shape[1])
    coact[:, idx, idx] = 0.0
    return coact


# ---------------------------------------------------------------------------------------------
# Trace files


def dump_trace(traffic: Traffic, per_source: bool = True) -> str:
    """Traffic as a version-1 trace (JSON); `per_source=False` keeps only expert totals."""
    layers = []
    for l, layer in enumerate(traffic.layer_ids):
        entry: dict[str, Any] = {"layer": int(layer)}
        if per_source:
            entry["tokens"] = _rounded(traffic.tokens[l])
        else:
            entry["expert_tokens"] = _rounded(traffic.tokens[l].sum(axis=0))
        e, f = np.nonzero(np.triu(traffic.coactivation[l], k=1))
        entry["coactivation"] = [[int(a), int(b), _num(traffic.coactivation[l, a, b])] for a, b in zip(e, f)]
        layers.append(entry)
    doc = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "top_k": traffic.top_k,
           "num_experts": traffic.num_experts, "sources": traffic.num_sources, "origin": traffic.origin,
           "layers": layers}
    return json.dumps(doc, separators=(",", ":"))


def save_trace(traffic: Traffic, path: str | Path, per_source: bool = True) -> Path:
    path = Path(path)
    path.write_text(dump_trace(traffic, per_source))
    return path


def load_trace(path: str | Path) -> Traffic:
    """Read a trace file; InvalidRequestError names the field that is wrong."""
    return parse_trace(read_text(path, "trace"), source=str(path))


def parse_trace(text: str, source: str = "trace") -> Traffic:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{source}: not valid JSON: {exc}") from exc
    # Step 1: header
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
        raise InvalidRequestError(f"{source}: format must be {TRACE_FORMAT!r}")
    if doc.get("version") != TRACE_VERSION:
        raise InvalidRequestError(f"{source}: version {doc.get('version')!r} unsupported (expected {TRACE_VERSION})")
    top_k, E, S = (_positive(doc, k, source) for k in ("top_k", "num_experts", "sources"))
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise InvalidRequestError(f"{source}: layers must be a non-empty list")
    # Step 2: one entry per layer
    ids, tokens, coact = [], [], []
    for i, entry in enumerate(raw_layers):
        where = f"{source}: layers[{i}]"
        if not isinstance(entry, dict) or not _is_int(entry.get("layer")) or entry["layer"] < 0:
            raise InvalidRequestError(f"{where}.layer must be a non-negative integer")
        ids.append(entry["layer"])
        tokens.append(_layer_tokens(entry, S, E, where))
        coact.append(_layer_coactivation(entry.get("coactivation", []), E, f"{where}.coactivation"))
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"{source}: a layer is listed twice in {ids}")
    t = np.stack(tokens)
    c = np.stack(coact)
    if not any("coactivation" in e for e in raw_layers):
        c = independent_coactivation(t.sum(axis=1), top_k)
    return Traffic(layer_ids=tuple(ids), tokens=t, coactivation=c, top_k=top_k,
                   origin=str(doc.get("origin", f"trace {source}")))


def _layer_tokens(entry: dict, S: int, E: int, where: str) -> np.ndarray:
    if ("tokens" in entry) == ("expert_tokens" in entry):
        raise InvalidRequestError(f"{where}: give exactly one of tokens ([sources][experts]) or expert_tokens")
    if "tokens" in entry:
        arr = _numbers(entry["tokens"], (S, E), f"{where}.tokens")
        return arr
    arr = _numbers(entry["expert_tokens"], (E,), f"{where}.expert_tokens")
    return np.repeat(arr[None, :] / S, S, axis=0)


def _layer_coactivation(raw: Any, E: int, where: str) -> np.ndarray:
    out = np.zeros((E, E))
    if not isinstance(raw, list):
        raise InvalidRequestError(f"{where} must be a list of [e, f, tokens]")
    for j, item in enumerate(raw):
        ok = (isinstance(item, list) and len(item) == 3 and _is_int(item[0]) and _is_int(item[1])
              and _is_number(item[2]) and 0 <= item[0] < item[1] < E and item[2] >= 0)
        if not ok:
            raise InvalidRequestError(f"{where}[{j}] must be [e, f, tokens] with 0 <= e < f < {E}, got {item!r}")
        out[item[0], item[1]] = out[item[1], item[0]] = float(item[2])
    return out


def _numbers(raw: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{where} must be numbers of shape {list(shape)}") from None
    if arr.shape != shape:
        raise InvalidRequestError(f"{where} has shape {list(arr.shape)}, expected {list(shape)}")
    if arr.size and (not np.isfinite(arr).all() or arr.min() < 0):
        raise InvalidRequestError(f"{where} must be finite and non-negative")
    return arr


def _positive(doc: dict, key: str, source: str) -> int:
    value = doc.get(key)
    if not _is_int(value) or value < 1:
        raise InvalidRequestError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _rounded(arr: np.ndarray) -> list:
    return np.round(arr, 3).tolist()


def _num(x: float) -> float:
    return round(float(x), 3)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
