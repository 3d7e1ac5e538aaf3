"""A bare 2-rank lockstep mesh (processes, real gloo) profiled: rank 0's step shows its waits on
the collectives (the step header, dispatch and combine) beside its compute."""

from __future__ import annotations

from moemesh.engine.profile import WAITS
from moemesh.mesh.profile import profile_mesh
from moemesh.model.tiny import TinySpec, write_tiny_model

SPEC = TinySpec(layers=2, experts=4, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=300)


def test_a_mesh_ranks_split_shows_its_collectives(tmp_path):
    model = write_tiny_model(tmp_path / "model", SPEC)
    split = profile_mesh(model, [[5, 6, 7, 8], [9, 10, 11]], workers=2, steps=3)
    names = {name for name, _, _ in split.rows()}
    assert set(WAITS) <= names and {"attention", "experts", "dispatch", "combine", "sampling"} <= names
    assert split.summary()["collectives"] > 0
