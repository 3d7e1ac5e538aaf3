"""Topology: the devices a mesh runs on and the links between them. Pure: no torch, no gRPC.

A topology is `nodes` x `devices_per_node` devices (the last node may be partial: `devices` less
than nodes x devices_per_node), each with `device_memory_bytes` and a compute rate, and two kinds
of link:

- intra-node (NVLink through an NVSwitch): every device has one port of `intra.bandwidth` each
  way, so device d's traffic to all its node peers shares that port;
- inter-node (InfiniBand): every node has one port of `inter.bandwidth` each way, shared by all
  its devices' cross-node traffic (the cost model's bottleneck for cross-node traffic).

Device g sits on node g // devices_per_node at local index g % devices_per_node (ranks are
numbered node by node, as launchers number them).

YAML (numbers are SI base units; strings may carry a unit):

    name: two-h100-nodes           # optional
    nodes: 2
    devices_per_node: 8
    devices: 16                    # optional; default nodes x devices_per_node
    device_memory: 80GB            # or device_memory_bytes: 80e9
    device_flops: 989e12           # FLOP/s one device sustains on expert matmuls
    intra_node: {bandwidth: 400GB/s, latency: 7.5us}
    inter_node: {bandwidth: 200GB/s, latency: 3us}

Bad files raise ConfigError naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moemesh.errors import ConfigError, read_text

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class LinkSpec:
    """One kind of link: bandwidth per port per direction and per-message latency."""

    bandwidth_bytes_per_s: float
    latency_s: float

    def time_s(self, num_bytes: np.ndarray | float) -> np.ndarray | float:
        """Seconds to move `num_bytes` through one port: latency + bytes / bandwidth (0 for 0 bytes)."""
        b = np.asarray(num_bytes, dtype=np.float64)
        return np.where(b > 0, self.latency_s + b / self.bandwidth_bytes_per_s, 0.0)


@dataclass(frozen=True)
class Topology:
    """Devices, their memory and compute, and the two link kinds (see the module docstring)."""

    name: str
    nodes: int
    devices_per_node: int
    devices: int
    device_memory_bytes: int
    device_flops_per_s: float
    intra: LinkSpec  # NVLink: one port per device
    inter: LinkSpec  # InfiniBand: one port per node

    def __post_init__(self) -> None:
        if not (self.nodes - 1) * self.devices_per_node < self.devices <= self.nodes * self.devices_per_node:
            raise ConfigError(
                f"topology {self.name!r}: devices={self.devices} does not fill {self.nodes} node(s) of "
                f"{self.devices_per_node} (the last node may be partial, not empty)"
            )

    @cached_property
    def node_of(self) -> np.ndarray:
        """[G] node index of each device."""
        return np.arange(self.devices) // self.devices_per_node

    @cached_property
    def local_of(self) -> np.ndarray:
        """[G] index of each device inside its node."""
        return np.arange(self.devices) % self.devices_per_node

    @cached_property
    def node_sizes(self) -> np.ndarray:
        """[N] devices on each node."""
        return np.bincount(self.node_of, minlength=self.nodes)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} = {self.devices} devices, "
            f"{self.device_memory_bytes / GB:.0f} GB each, {self.device_flops_per_s / 1e12:.3g} TFLOP/s; "
            f"intra-node {self.intra.bandwidth_bytes_per_s / GB:.3g} GB/s {self.intra.latency_s * 1e6:.3g} us; "
            f"inter-node {self.inter.bandwidth_bytes_per_s / GB:.3g} GB/s {self.inter.latency_s * 1e6:.3g} us per node"
        )

    @staticmethod
    def preset(name: str, devices: int | None = None) -> Topology:
        """A named topology; `devices` resizes it (paper presets keep 8 per node, `local` stays one node)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown topology preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name](devices)


# The paper (../shared/paper.md, "Network Topology Parameters"): NVLink 400 GB/s, InfiniBand 200 GB/s
# per link, intra-node latency 5-10 us, inter-node 1-5 us. We take the midpoints, 7.5 us and 3 us.
# That inter-node is quicker than intra-node is the paper's figure, not hardware truth (an RDMA
# round trip is slower than an NVLink hop); at these message sizes latency is <1% of a layer, so
# the choice does not move any placement decision. H100 SXM: 80 GB HBM3, 989 TFLOP/s dense FP16.
H100_MEMORY_BYTES = 80 * 10**9
H100_FLOPS = 989e12
NVLINK = LinkSpec(bandwidth_bytes_per_s=400 * GB, latency_s=7.5e-6)
INFINIBAND = LinkSpec(bandwidth_bytes_per_s=200 * GB, latency_s=3e-6)


def h100_cluster(devices: int, devices_per_node: int = 8, name: str | None = None) -> Topology:
    """`devices` H100s, `devices_per_node` per node (last node partial), with the paper's links."""
    if devices < 1 or devices_per_node < 1:
        raise ConfigError(
            f"an H100 cluster needs devices >= 1 and devices_per_node >= 1, got {devices}, {devices_per_node}")
    return Topology(
        name=name or f"h100x{devices}", nodes=math.ceil(devices / devices_per_node),
        devices_per_node=devices_per_node, devices=devices, device_memory_bytes=H100_MEMORY_BYTES,
        device_flops_per_s=H100_FLOPS, intra=NVLINK, inter=INFINIBAND,
    )


# This machine (../shared/field-notes.md): gloo all_to_all_single between processes on loopback
# moves 16 MiB in ~10 ms (~1.6 GB/s; a plain memory copy reaches ~10 GB/s, gloo does not) and a
# tiny collective takes 0.12-0.25 ms, so 0.2 ms. One fp32 thread does ~50 GFLOP/s; 24 GiB of
# memory is shared by the processes. Loopback has no second node: `inter` is never used.
LOCAL_LINK = LinkSpec(bandwidth_bytes_per_s=1.6 * GB, latency_s=0.2e-3)
LOCAL_MEMORY_BYTES = 24 * GiB
LOCAL_FLOPS = 50e9


def local_topology(devices: int | None = None) -> Topology:
    """`devices` CPU worker processes on this machine (default 4, what `make run` starts)."""
    n = 4 if devices is None else devices
    if n < 1:
        raise ConfigError(f"local topology needs at least 1 device, got {n}")
    return Topology(
        name=f"local-{n}", nodes=1, devices_per_node=n, devices=n, device_memory_bytes=LOCAL_MEMORY_BYTES // n,
        device_flops_per_s=LOCAL_FLOPS, intra=LOCAL_LINK, inter=LOCAL_LINK,
    )


def _paper(devices: int | None) -> Topology:
    """The paper's testbed; other sizes keep its nodes of 8 and its links."""
    g = 16 if devices is None else devices
    return h100_cluster(g, name="paper-16xh100" if g == 16 else f"paper-h100x{g}")


PRESETS = {
    "paper-16xh100": _paper,
    "h100x64": lambda devices: h100_cluster(64 if devices is None else devices),
    "h100x256": lambda devices: h100_cluster(256 if devices is None else devices),
    "h100x1024": lambda devices: h100_cluster(1024 if devices is None else devices),
    "local": local_topology,
}


def resolve_topology(spec: str | Path, devices: int | None = None) -> Topology:
    """A preset name or a YAML file path; `devices` resizes a preset and must match a file."""
    if str(spec) in PRESETS:
        return Topology.preset(str(spec), devices)
    topo = load_topology(spec)
    if devices is not None and devices != topo.devices:
        raise ConfigError(f"--devices {devices} but topology file {spec} describes {topo.devices} devices")
    return topo


def load_topology(path: str | Path) -> Topology:
    """Read a topology YAML file; ConfigError names the file and the field."""
    return parse_topology(read_text(path, "topology", ConfigError), source=str(path))


def parse_topology(text: str, source: str = "topology") -> Topology:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return topology_from_dict(data, source)


_KEYS = {"name", "nodes", "devices_per_node", "devices", "device_memory", "device_memory_bytes",
         "device_flops", "device_flops_per_s", "intra_node", "inter_node"}
_LINK_KEYS = {"bandwidth", "bandwidth_bytes_per_s", "latency", "latency_s"}


def topology_from_dict(data: Any, source: str = "topology") -> Topology:
    """Build a Topology from parsed YAML (see the module docstring for the fields)."""
    # Step 1: shape and unknown keys
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of topology fields, got {_kind(data)}")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(_KEYS)}")
    # Step 2: counts
    nodes = _count(data, "nodes", source)
    per_node = _count(data, "devices_per_node", source)
    devices = _count(data, "devices", source, default=nodes * per_node)
    if not (nodes - 1) * per_node < devices <= nodes * per_node:
        raise ConfigError(f"{source}: devices={devices} does not fill {nodes} node(s) of {per_node} "
                          f"(the last node may be partial, not empty)")
    # Step 3: quantities with units
    memory = _quantity(data, ("device_memory", "device_memory_bytes"), _BYTES, source)
    flops = _quantity(data, ("device_flops", "device_flops_per_s"), _FLOPS, source, default=H100_FLOPS)
    topo = Topology(
        name=str(data.get("name", Path(source).stem)), nodes=nodes, devices_per_node=per_node, devices=devices,
        device_memory_bytes=int(memory), device_flops_per_s=flops,
        intra=_link(data, "intra_node", source), inter=_link(data, "inter_node", source, required=nodes > 1),
    )
    return topo


def _link(data: Mapping, key: str, source: str, required: bool = True) -> LinkSpec:
    raw = data.get(key)
    if raw is None:
        if required:
            raise ConfigError(f"{source}: {key} is required (bandwidth and latency)")
        return LinkSpec(bandwidth_bytes_per_s=1.0, latency_s=0.0)  # never used: one node
    where = f"{source}: {key}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping with bandwidth and latency, got {_kind(raw)}")
    unknown = sorted(str(k) for k in raw if k not in _LINK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(_LINK_KEYS)}")
    bandwidth = _quantity(raw, ("bandwidth", "bandwidth_bytes_per_s"), _BANDWIDTH, where)
    latency = _quantity(raw, ("latency", "latency_s"), _SECONDS, where, allow_zero=True)
    return LinkSpec(bandwidth_bytes_per_s=bandwidth, latency_s=latency)


def _count(data: Mapping, key: str, source: str, default: int | None = None) -> int:
    if key not in data:
        if default is None:
            raise ConfigError(f"{source}: {key} is required")
        return default
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}
_BANDWIDTH = {f"{k}/s": v for k, v in _BYTES.items() if k} | {"": 1}
_SECONDS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_FLOPS = {"": 1, "flop/s": 1, "gflop/s": 1e9, "tflop/s": 1e12, "pflop/s": 1e15}
_QUANTITY = re.compile(r"^\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zµ/]*)\s*$", re.IGNORECASE)


def _quantity(data: Mapping, keys: tuple[str, str], units: dict[str, float], source: str,
              default: float | None = None, allow_zero: bool = False) -> float:
    """Read `keys[0]` (number or "number unit") or `keys[1]` (number in base units); exactly one."""
    given = [k for k in keys if k in data]
    if len(given) > 1:
        raise ConfigError(f"{source}: give one of {keys[0]} or {keys[1]}, not both")
    if not given:
        if default is None:
            raise ConfigError(f"{source}: {keys[0]} is required")
        return default
    key = given[0]
    value = data[key]
    allowed: dict[str, float] = units if key == keys[0] else {"": 1}
    number = _parse_quantity(value, allowed)
    if number is None:
        hint = ", ".join(u for u in allowed if u) or "none (base units)"
        raise ConfigError(f"{source}: {key} must be a number (units: {hint}), got {value!r}")
    if number < 0 or (number == 0 and not allow_zero) or not math.isfinite(number):
        raise ConfigError(f"{source}: {key} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")
    return number


def _parse_quantity(value: Any, units: dict[str, float]) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    match = _QUANTITY.match(value)
    if not match or match.group(2).lower() not in units:
        return None
    return float(match.group(1)) * units[match.group(2).lower()]


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
