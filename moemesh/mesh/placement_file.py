"""Placement files: an operator's expert placement written as YAML or JSON. Pure: no torch, no gRPC.

Two shapes are accepted (JSON is YAML, so one parser reads both):

    experts: [[0], [1], [2, 3]]          # expert e -> ranks, the same for every MoE layer
    world_size: 4                         # optional; default: max rank + 1

    layers:                               # model layer index -> one rank list per expert
      "0": [[0], [1], [2], [3]]
      "1": [[1], [0], [3], [2]]

An entry of a rank list may itself be a list: a shard group, one replica of the expert split
over those ranks (expert tensor parallelism; the i-th rank holds shard i):

    experts: [[0], [1], [[2, 3]], [4, [5, 6]]]   # expert 2 split over ranks 2 and 3; expert 3
                                                  # whole on rank 4 and split over ranks 5 and 6

Optional gating factors (policy "gating"), one positive factor per expert: a list for every MoE
layer, or per layer (`gating: {"0": [1.0, 0.5], "1": [1.0, 1.0]}`); none = exact routing.

Each entry becomes one replica group of `Placement.replicas` as written (the placement puts them
in its canonical order). `epoch` and `origin` keys are accepted and ignored: a loaded placement
has epoch 0 and origin "file", and `dump_placement` output loads back equal up to those two.
Loading checks the file's structure and names the offending field; whether the placement fits
the model (layer ids, expert count) is `validate_placement`'s job, done by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from moemesh.errors import InvalidRequestError, read_text
from moemesh.mesh.placement import Groups, Placement

_KNOWN_KEYS = {"experts", "layers", "world_size", "gating", "epoch", "origin"}
FILE_ORIGIN = "file"


def load_placement(
    path: str | Path, moe_layer_ids: Iterable[int], default_world_size: int | None = None
) -> Placement:
    """Read a placement file (YAML or JSON) into a Placement with epoch 0 and origin "file".

    `moe_layer_ids` are the model's MoE layers (the `experts` shape applies to each of them);
    `default_world_size` is used when the file has no `world_size` (else max rank + 1).
    """
    text = read_text(path, "placement file")
    return parse_placement(text, moe_layer_ids, default_world_size, source=str(path))


def parse_placement(
    text: str, moe_layer_ids: Iterable[int], default_world_size: int | None = None, source: str = "placement"
) -> Placement:
    """Parse placement text (YAML or JSON); see `load_placement`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"{source}: not valid YAML or JSON: {exc}") from exc
    return placement_from_dict(data, moe_layer_ids, default_world_size, source)


def placement_from_dict(
    data: Any, moe_layer_ids: Iterable[int], default_world_size: int | None = None, source: str = "placement"
) -> Placement:
    """Build a Placement from already-parsed data (a mapping with `experts` or `layers`)."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError(f"{source}: expected a mapping with 'experts' or 'layers', got {_kind(data)}")
    unknown = sorted(str(k) for k in data if k not in _KNOWN_KEYS)
    if unknown:
        raise InvalidRequestError(f"{source}: unknown field(s) {unknown}; known: {sorted(_KNOWN_KEYS)}")
    if ("experts" in data) == ("layers" in data):
        raise InvalidRequestError(f"{source}: give exactly one of 'experts' (every MoE layer) or 'layers'")
    if "experts" in data:
        table = _expert_table(data["experts"], f"{source}: experts")
        tables = {int(layer): table for layer in moe_layer_ids}
    else:
        tables = _layers(data["layers"], source)
    world_size = _world_size(data.get("world_size"), tables, default_world_size, source)
    gating = _gating(data.get("gating"), tables, source)
    return Placement(epoch=0, world_size=world_size, replicas=tables, origin=FILE_ORIGIN, gating=gating)


def dump_placement(p: Placement) -> str:
    """The placement as YAML in the `layers` shape; `load_placement` gives it back with epoch 0
    and origin "file" (everything else exact)."""
    doc: dict[str, Any] = {
        "epoch": p.epoch,
        "origin": p.origin,
        "world_size": p.world_size,
        "layers": {layer: [[g[0] if len(g) == 1 else list(g) for g in groups] for groups in p.replicas[layer]]
                   for layer in sorted(p.replicas)},
    }
    if p.gating:
        doc["gating"] = {layer: list(p.gating[layer]) for layer in sorted(p.gating)}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def _layers(raw: Any, source: str) -> dict[int, tuple[Groups, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidRequestError(f"{source}: layers must be a non-empty mapping layer -> expert rank lists")
    layers: dict[int, tuple[Groups, ...]] = {}
    for key, table in raw.items():
        layer = _layer_index(key, source)
        if layer in layers:
            raise InvalidRequestError(f"{source}: layers[{key!r}]: layer {layer} given twice")
        layers[layer] = _expert_table(table, f"{source}: layers[{key!r}]")
    return layers


def _gating(raw: Any, tables: Mapping[int, tuple[Groups, ...]], source: str) -> dict[int, tuple[float, ...]]:
    """`gating`: a list of factors (one per expert) for every layer, or layer -> such a list."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        return {layer: _factors(raw, len(table), f"{source}: gating") for layer, table in tables.items()}
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(f"{source}: gating must be a list of factors or a mapping layer -> factors, "
                                  f"got {_kind(raw)}")
    gating = {}
    for key, factors in raw.items():
        layer = _layer_index(key, source)
        if layer not in tables:
            raise InvalidRequestError(f"{source}: gating[{key!r}]: layer {layer} is not placed")
        if layer in gating:
            raise InvalidRequestError(f"{source}: gating[{key!r}]: layer {layer} given twice")
        gating[layer] = _factors(factors, len(tables[layer]), f"{source}: gating[{key!r}]")
    return gating


def _factors(raw: Any, num_experts: int, where: str) -> tuple[float, ...]:
    if not isinstance(raw, list) or len(raw) != num_experts:
        raise InvalidRequestError(f"{where} must be a list of {num_experts} factors (one per expert), got {raw!r}")
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in raw):
        raise InvalidRequestError(f"{where}: factors must be positive numbers, got {raw!r}")
    return tuple(float(f) for f in raw)


def _layer_index(key: Any, source: str) -> int:
    if isinstance(key, bool):
        raise InvalidRequestError(f"{source}: layers key {key!r} is not a layer index")
    try:
        layer = int(key)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{source}: layers key {key!r} is not a layer index") from None
    if layer < 0 or (isinstance(key, str) and key.strip() != str(layer)):
        raise InvalidRequestError(f"{source}: layers key {key!r} is not a non-negative layer index")
    return layer


def _expert_table(raw: Any, where: str) -> tuple[Groups, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError(f"{where} must be a non-empty list (one rank list per expert), got {_kind(raw)}")
    table = []
    for e, entries in enumerate(raw):
        if not isinstance(entries, list) or not entries:
            raise InvalidRequestError(f"{where}[{e}] must be a non-empty list of ranks, got {_kind(entries)}")
        groups = tuple(_group(entry, f"{where}[{e}]") for entry in entries)
        ranks = [r for g in groups for r in g]
        if len(set(ranks)) != len(ranks):
            raise InvalidRequestError(f"{where}[{e}]: rank listed twice in {entries}")
        table.append(groups)
    return tuple(table)


def _group(entry: Any, where: str) -> tuple[int, ...]:
    """A rank (a whole replica) or a list of >= 2 ranks (a shard group, in shard order)."""
    ranks = entry if isinstance(entry, list) else [entry]
    if isinstance(entry, list) and len(entry) < 2:
        raise InvalidRequestError(f"{where}: shard group {entry} needs at least 2 ranks")
    for r in ranks:
        if not _is_int(r) or r < 0:
            raise InvalidRequestError(f"{where}: rank {r!r} is not a non-negative integer")
    return tuple(ranks)


def _world_size(raw: Any, tables: Mapping[int, tuple[Groups, ...]], default: int | None, source: str) -> int:
    highest = max((r for table in tables.values() for groups in table for g in groups for r in g), default=-1)
    if raw is None:
        size = default if default is not None else highest + 1
        if size <= highest:
            raise InvalidRequestError(
                f"{source}: rank {highest} used but the world has {size} ranks (set 'world_size' or fix the ranks)"
            )
        return size
    if not _is_int(raw) or raw <= 0:
        raise InvalidRequestError(f"{source}: world_size must be a positive integer, got {raw!r}")
    if raw <= highest:
        raise InvalidRequestError(f"{source}: world_size is {raw} but rank {highest} is used (ranks are 0..{raw - 1})")
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
