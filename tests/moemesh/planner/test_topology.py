"""moemesh.planner.topology: presets, the cluster generator, YAML files and their errors."""

from __future__ import annotations

import pytest

from moemesh.errors import ConfigError
from moemesh.planner.topology import (
    Topology,
    h100_cluster,
    load_topology,
    parse_topology,
    resolve_topology,
)

GOOD = """
name: two-nodes
nodes: 2
devices_per_node: 8
device_memory: 80GB
device_flops: 989e12
intra_node: {bandwidth: 400GB/s, latency: 7.5us}
inter_node: {bandwidth: 200GB/s, latency: 3us}
"""


def test_paper_preset_has_the_papers_numbers():
    t = Topology.preset("paper-16xh100")
    assert (t.nodes, t.devices_per_node, t.devices) == (2, 8, 16)
    assert t.device_memory_bytes == 80e9
    assert t.intra.bandwidth_bytes_per_s == 400e9 and t.inter.bandwidth_bytes_per_s == 200e9
    assert t.intra.latency_s == pytest.approx(7.5e-6) and t.inter.latency_s == pytest.approx(3e-6)
    assert list(t.node_of[:9]) == [0] * 8 + [1] and list(t.local_of[6:10]) == [6, 7, 0, 1]


@pytest.mark.parametrize("devices, nodes", [(64, 8), (256, 32), (1024, 128), (20, 3)])
def test_cluster_generator_keeps_eight_per_node(devices, nodes):
    t = h100_cluster(devices)
    assert (t.devices, t.nodes, t.devices_per_node) == (devices, nodes, 8)
    assert t.node_sizes.sum() == devices and t.node_sizes[-1] == devices - 8 * (nodes - 1)
    assert Topology.preset("paper-16xh100", devices).devices == devices
    assert Topology.preset(f"h100x{devices}" if devices in (64, 256, 1024) else "paper-16xh100", devices).nodes == nodes


def test_local_preset_is_one_node_of_processes():
    t = Topology.preset("local", 3)
    assert (t.nodes, t.devices) == (1, 3)
    assert t.intra.latency_s == pytest.approx(0.2e-3)
    assert Topology.preset("local").devices == 4


def test_yaml_with_units_equals_the_preset(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    t = load_topology(path)
    p = Topology.preset("paper-16xh100")
    assert (t.nodes, t.devices, t.device_memory_bytes, t.device_flops_per_s) == (2, 16, p.device_memory_bytes, 989e12)
    for mine, theirs in ((t.intra, p.intra), (t.inter, p.inter)):
        assert mine.bandwidth_bytes_per_s == theirs.bandwidth_bytes_per_s
        assert mine.latency_s == pytest.approx(theirs.latency_s)
    assert resolve_topology(path).name == "two-nodes"
    assert resolve_topology("paper-16xh100", 32).devices == 32


def test_base_unit_fields_and_a_partial_last_node():
    t = parse_topology("nodes: 2\ndevices_per_node: 4\ndevices: 6\ndevice_memory_bytes: 1000\n"
                       "intra_node: {bandwidth_bytes_per_s: 5.0e+9, latency_s: 0}\n"
                       "inter_node: {bandwidth: 1GiB/s, latency: 1ms}\n")
    assert list(t.node_sizes) == [4, 2] and t.inter.bandwidth_bytes_per_s == 2**30 and t.inter.latency_s == 1e-3


@pytest.mark.parametrize("text, field", [
    ("- 1\n- 2\n", "expected a mapping"),
    (GOOD.replace("nodes: 2\n", ""), "nodes is required"),
    (GOOD.replace("nodes: 2", "nodes: two"), "nodes must be a positive integer"),
    (GOOD + "colour: red\n", "unknown field(s) ['colour']"),
    (GOOD.replace("400GB/s", "fast"), "intra_node: bandwidth must be a number"),
    (GOOD.replace("3us", "-3us"), "inter_node: latency must be a number"),
    (GOOD.replace("device_memory: 80GB", "device_memory: 80GB/s"), "device_memory must be a number"),
    (GOOD.replace("device_memory: 80GB", "device_memory: 80GB\ndevice_memory_bytes: 1"), "not both"),
    (GOOD.replace("inter_node: {bandwidth: 200GB/s, latency: 3us}", ""), "inter_node is required"),
    (GOOD.replace("latency: 7.5us}", "latency: 7.5us, jitter: 1}"), "intra_node: unknown field(s) ['jitter']"),
    (GOOD + "devices: 4\n", "devices=4 does not fill 2 node(s)"),
    ("nodes: [", "not valid YAML"),
])
def test_bad_files_name_the_field(text, field):
    with pytest.raises(ConfigError) as err:
        parse_topology(text, source="t.yaml")
    assert field in str(err.value) and "t.yaml" in str(err.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown topology preset 'nope'"):
        Topology.preset("nope")
    with pytest.raises(ConfigError, match="cannot read topology"):
        resolve_topology(tmp_path / "missing.yaml")
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match="--devices 8 but topology file"):
        resolve_topology(path, 8)
