"""Checkpoint reading: safetensors, one file or sharded, loading only what a process asks for.

Tensor names are the Hugging Face per-expert layout (see `weights.py`). Reading goes through
safetensors' lazy `safe_open`, so a process that holds expert 3 of 16 never touches the bytes of
the other experts. Every tensor comes back as fp32 on CPU (this machine's half-precision matmuls
are ~100x slower), or in the dtype the caller asks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from moemesh.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Maps tensor names to the shard files that hold them; reads tensors on demand.

    `reads` records, in order, every tensor name this reader has loaded: the tests use it to
    prove that partial loading reads only what was asked for.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.name_to_file = _index(self.model_dir)
        self.reads: list[str] = []
        self.bytes_read = 0  # bytes of the tensors (or slices) read so far, as stored: load progress

    def has(self, name: str) -> bool:
        return name in self.name_to_file

    def read(
        self,
        expected: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        slices: Mapping[str, tuple[slice, ...]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read the named tensors, checking each full shape; returns name -> tensor in `dtype`.

        `slices[name]`, when given, reads only that part of the tensor (one slice per leading
        dimension): an expert shard never reads its siblings' bytes. Every tensor (whole or a
        slice) is first materialised in host memory by safetensors (framework "pt" reads to the
        CPU), then converted and copied to `device` (for a GPU: one host copy at a time).
        """
        slices = slices or {}
        out: dict[str, torch.Tensor] = {}
        for file, names in _group_by_file(self.name_to_file, expected, self.model_dir).items():
            with _open(file) as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"tensor {name} is missing from {file.name} (the index lists it there)")
                    view = handle.get_slice(name)
                    shape = tuple(view.get_shape())
                    if shape != tuple(expected[name]):
                        raise CheckpointError(
                            f"tensor {name} in {file.name} has shape {shape}, expected {tuple(expected[name])}"
                        )
                    tensor = view[slices[name]] if name in slices else handle.get_tensor(name)
                    self.reads.append(name)
                    self.bytes_read += tensor.numel() * tensor.element_size()
                    out[name] = tensor.to(device=device, dtype=dtype)
        return out


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {exc}") from exc


def _index(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        return dict(weight_map)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in {model_dir}")
    mapping: dict[str, str] = {}
    for file in files:
        with _open(file) as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is no mapping: no iteration, only keys()
                mapping[name] = file.name
    return mapping


def _group_by_file(
    name_to_file: Mapping[str, str], names: Iterable[str], model_dir: Path
) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for name in names:
        file = name_to_file.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {model_dir}")
        path = model_dir / file
        if not path.is_file():
            raise CheckpointError(f"tensor {name} should be in {file}, which does not exist in {model_dir}")
        groups.setdefault(path, []).append(name)
    return groups
