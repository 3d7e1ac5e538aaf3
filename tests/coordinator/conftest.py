"""Coordinator test fixtures: one tiny checkpoint (2 MoE layers x 8 experts) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.model.tiny import TinySpec, write_tiny_model

TINY = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mixtral-style checkpoint folder: layers 0 and 1 are MoE, 8 experts each, top-2."""
    return write_tiny_model(tmp_path_factory.mktemp("coordinator") / "tiny", TINY)
