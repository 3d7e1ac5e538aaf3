"""moemesh.mesh.placement_file: placement files (YAML / JSON) -> Placement, and back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings

from moemesh.errors import InvalidRequestError
from moemesh.mesh.placement import initial_placement, validate_placement
from moemesh.mesh.placement_file import (
    FILE_ORIGIN,
    dump_placement,
    load_placement,
    parse_placement,
)
from tests.moemesh.mesh.placement_strategies import placements

MOE_LAYERS = (0, 1)


def test_experts_shape_applies_to_every_moe_layer(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("experts:\n  - [1]\n  - [0]\n  - [1, 0]\n  - [0]\n")
    p = load_placement(path, MOE_LAYERS)
    assert (p.epoch, p.origin, p.world_size) == (0, "file", 2)
    assert p.layers == {0: ((1,), (0,), (0, 1), (0,)), 1: ((1,), (0,), (0, 1), (0,))}
    validate_placement(p, 4, MOE_LAYERS)


def test_layers_shape_from_json_with_string_keys(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"layers": {"0": [[0], [1]], "1": [[1], [0]]}, "world_size": 4}))
    p = load_placement(path, MOE_LAYERS)
    assert p.world_size == 4
    assert p.layers == {0: ((0,), (1,)), 1: ((1,), (0,))}


def test_layers_shape_from_yaml_with_integer_keys():
    p = parse_placement("layers:\n  3: [[2], [0]]\n  5: [[1], [2]]\n", (3, 5))
    assert p.layers == {3: ((2,), (0,)), 5: ((1,), (2,))} and p.world_size == 3


def test_default_world_size_is_used_when_the_file_has_none():
    assert parse_placement("experts: [[0], [1]]", MOE_LAYERS, default_world_size=4).world_size == 4
    with pytest.raises(InvalidRequestError, match="rank 1 used but the world has 1 ranks"):
        parse_placement("experts: [[0], [1]]", MOE_LAYERS, default_world_size=1)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a mapping"),
    ("", "expected a mapping"),
    ("world_size: 2", "exactly one of 'experts'"),
    ("experts: [[0]]\nlayers: {0: [[0]]}", "exactly one of 'experts'"),
    ("experts: [[0]]\nexpert: [[0]]", r"unknown field\(s\) \['expert'\]"),
    ("experts: []", "experts must be a non-empty list"),
    ("experts: {0: [0]}", "experts must be a non-empty list"),
    ("experts: [[0], []]", r"experts\[1\] must be a non-empty list of ranks"),
    ("experts: [[0], 1]", r"experts\[1\] must be a non-empty list of ranks, got int"),
    ("experts: [[0], [-1]]", r"experts\[1\]: rank -1 is not a non-negative integer"),
    ("experts: [[0], [true]]", r"experts\[1\]: rank True is not"),
    ("experts: [[0], ['1']]", r"experts\[1\]: rank '1' is not"),
    ("experts: [[0, 0]]", r"experts\[0\]: rank listed twice"),
    ("experts: [[0], [3]]\nworld_size: 2", "world_size is 2 but rank 3 is used"),
    ("experts: [[0]]\nworld_size: 0", "world_size must be a positive integer"),
    ("experts: [[0]]\nworld_size: two", "world_size must be a positive integer"),
    ("layers: {}", "layers must be a non-empty mapping"),
    ("layers: {x: [[0]]}", r"layers key 'x' is not a layer index"),
    ("layers: {'-1': [[0]]}", "not a non-negative layer index"),
    ("layers: {0: [[0]], '0': [[0]]}", "layer 0 given twice"),
    ("layers: {'0': [[0], [a]]}", r"layers\['0'\]\[1\]: rank 'a'"),
    ("experts: [[0]\n", "not valid YAML or JSON"),
    ("experts: [[[0]]]", r"experts\[0\]: shard group \[0\] needs at least 2 ranks"),
    ("experts: [[[0, x]]]", r"experts\[0\]: rank 'x' is not"),
    ("experts: [[0, [1, 0]]]", r"experts\[0\]: rank listed twice"),
    ("experts: [[0]]\ngating: 2", "gating must be a list of factors or a mapping"),
    ("experts: [[0], [1]]\ngating: [1.0]", r"gating must be a list of 2 factors"),
    ("experts: [[0]]\ngating: [0]", "factors must be positive numbers"),
    ("experts: [[0]]\ngating: [true]", "factors must be positive numbers"),
    ("experts: [[0]]\ngating: {7: [1.0]}", r"gating\[7\]: layer 7 is not placed"),
    ("experts: [[0]]\ngating: {0: [1.0], '0': [1.0]}", r"gating\['0'\]: layer 0 given twice"),
])
def test_bad_files_name_the_field(text, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_placement(text, MOE_LAYERS)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidRequestError, match="cannot read placement file"):
        load_placement(tmp_path / "nope.yaml", MOE_LAYERS)


def test_dump_loads_back(tmp_path):
    original = initial_placement(num_experts=8, moe_layers=(1, 3), world_size=3, epoch=7)
    text = dump_placement(original)
    assert text.startswith("epoch: 7\norigin: initial\nworld_size: 3\nlayers:\n  1:\n  - [0]\n")
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    back = load_placement(path, (1, 3))
    assert back.layers == original.layers and back.world_size == 3 and back.epoch == 0


def test_shard_groups_load_and_dump_back():
    text = "experts: [[0], [1], [[2, 3]], [4, [6, 5]]]"
    p = parse_placement(text, MOE_LAYERS)
    validate_placement(p, num_experts=4, moe_layers=MOE_LAYERS, expert_hidden=64)
    assert p.world_size == 7
    assert p.layers[0] == ((0,), (1,), (2, 3), (4, 5, 6))  # every holder, sorted
    assert p.replicas[0] == (((0,),), ((1,),), ((2, 3),), ((4,), (6, 5)))  # shard order as written
    assert p.groups(0, 3) == ((4,), (6, 5))
    back = parse_placement(dump_placement(p), MOE_LAYERS)
    assert back == p


def test_gating_factors_load_for_every_layer_or_per_layer_and_dump_back():
    every = parse_placement("experts: [[0], [1]]\ngating: [1, 0.5]", MOE_LAYERS)
    assert every.gating == {0: (1.0, 0.5), 1: (1.0, 0.5)}
    one = parse_placement("experts: [[0], [1]]\ngating: {'1': [2.0, 0.25]}", MOE_LAYERS)
    assert one.gating == {1: (2.0, 0.25)}
    validate_placement(one, 2, MOE_LAYERS)
    assert parse_placement(dump_placement(one), MOE_LAYERS) == one


@settings(max_examples=100, deadline=None)
@given(placements())
def test_file_round_trip_is_lossless_but_for_epoch_and_origin(p):
    back = parse_placement(dump_placement(p), p.replicas)
    assert back == replace(p, epoch=0, origin=FILE_ORIGIN)
