"""Hypothesis strategies for valid placements (moemesh.mesh.placement), shard groups and gating
included; shared by the placement, placement file and planner slot tests."""

from __future__ import annotations

from hypothesis import strategies as st

from moemesh.mesh.placement import Group, Groups, Placement

ORIGINS = st.sampled_from(["initial", "round_robin", "split", "gating", "replicate", "manual", "planner:ours"])


@st.composite
def replica_groups(draw: st.DrawFn, world_size: int, max_group: int) -> Groups:
    """One expert's replica groups: distinct ranks cut into groups of 1 (whole) to `max_group`,
    in a random order (the placement puts them in canonical order)."""
    ranks = draw(st.permutations(range(world_size)))
    held = ranks[:draw(st.integers(1, world_size))]
    groups: list[Group] = []
    while held:
        size = draw(st.integers(1, min(max_group, len(held))))
        groups.append(tuple(held[:size]))
        held = held[size:]
    return tuple(groups)


@st.composite
def placements(draw: st.DrawFn, max_world: int = 6, max_experts: int = 5, max_group: int = 4,
               gating: bool = True) -> Placement:
    """A placement that passes validate_placement for its own layers and expert count.
    max_group=1: whole replicas only (what planner slot tables hold)."""
    world_size = draw(st.integers(1, max_world))
    num_experts = draw(st.integers(1, max_experts))
    layer_ids = draw(st.lists(st.integers(0, 63), min_size=1, max_size=3, unique=True))
    replicas = {layer: tuple(draw(replica_groups(world_size, max_group)) for _ in range(num_experts))
                for layer in layer_ids}
    factor = st.floats(min_value=1e-3, max_value=1e3)  # float64: the placement keeps float32
    gated = draw(st.lists(st.sampled_from(layer_ids), unique=True)) if gating else []
    factors = {layer: tuple(draw(st.lists(factor, min_size=num_experts, max_size=num_experts))) for layer in gated}
    return Placement(epoch=draw(st.integers(0, 2**40)), world_size=world_size, replicas=replicas,
                     origin=draw(ORIGINS), gating=factors)


def num_experts(p: Placement) -> int:
    return len(next(iter(p.replicas.values())))
