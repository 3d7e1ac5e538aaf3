"""coordinator.placement_admin: what `moemesh placement show` prints, shard groups included."""

from __future__ import annotations

from coordinator.placement_admin import format_placement, placement_yaml
from moemesh.mesh.placement import Placement
from moemesh.mesh.placement_file import parse_placement
from moemesh.mesh.placement_wire import placement_to_proto
from moemesh.v1 import coordinator_pb2 as pb


def test_show_prints_shard_groups_in_shard_order_and_the_yaml_loads_back():
    p = Placement(epoch=3, world_size=4, replicas={0: (((0,),), ((1,), (3, 2)))}, origin="split")
    resp = pb.GetPlacementResponse(placement=placement_to_proto(p, world_generation=1), window_tokens=0)
    table = format_placement(resp)
    assert "placement epoch 3 (split)" in table
    assert [line.split()[:2] for line in table.splitlines() if line.strip().startswith(("0 ", "1 "))] == [
        ["0", "0"], ["1", "1,3+2"]]
    back = parse_placement(placement_yaml(resp), (0,))
    assert back.replicas == p.replicas
