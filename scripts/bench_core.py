"""`make bench-core`: the single-process engine against transformers' generate(), and against
this machine's roofline, all measured in one run (these machines are noisy: compare ratios).

Model: Mixtral layout, hidden 512, intermediate 1024, 16 experts, top-2, 4 layers; batch 16,
128-token prompts, 64 new tokens. Both engines compute in fp32 with the same torch threads.
A second row runs the DeepSeek-V3 layout at the same sizes (MLA with q_lora_rank 256, kv_lora_rank
128, rope 32 of 64+32 per head; 1 dense layer then 3 MoE layers of 16 routed experts top-2 in 4
groups (2 kept) plus 1 shared expert), against transformers' DeepseekV3ForCausalLM; its roofline is
not modelled (the roofline line is Mixtral's).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from moemesh.engine.engine import Engine
from moemesh.engine.profile import decode_split
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.settings import option, parse_bool, parse_settings

SPEC = TinySpec(arch="mixtral", layers=4, experts=16, top_k=2, hidden=512, intermediate=1024, heads=8,
                kv_heads=8, vocab=512, seed=0)
DEEPSEEK_SPEC = TinySpec(arch="deepseek_v3", layers=4, experts=16, top_k=2, hidden=512, intermediate=1024, heads=8,
                         kv_heads=8, vocab=512, seed=0, groups=4, topk_group=2, shared_experts=1)


@dataclass(frozen=True)
class BenchCoreSettings:
    """The load and the cores; flags only (a command line says what ran)."""

    ENV_PREFIX: ClassVar[str | None] = None

    batch: int = option("--batch", "sequences decoded together", int, default=16)
    prompt_len: int = option("--prompt-len", "tokens per prompt", int, default=128)
    new_tokens: int = option("--new-tokens", "tokens generated per sequence", int, default=64)
    threads: int = option("--threads", "torch threads for both engines", int, default=torch.get_num_threads())
    json_path: Path | None = option("--json", "also write the results here", Path, default=None, metavar="JSON")
    profile: bool = option("--profile", "also print where a decode step's time goes (torch.profiler)", parse_bool,
                           default=False)


def measure_machine(threads: int) -> dict[str, float]:
    """Copy bandwidth (bytes copied per second, 256 MiB into an existing buffer) and the fp32
    matmul rate (1024 x 4096 x 1024), best of a few tries."""
    torch.set_num_threads(threads)
    src = torch.randn(64 * 1024 * 1024)  # 256 MiB
    dst = torch.empty_like(src)
    copy = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    a, b = torch.randn(1024, 4096), torch.randn(4096, 1024)
    mm = min(_timed(lambda: a @ b) for _ in range(5))
    return {"copy_GBps": src.nbytes / copy / 1e9, "matmul_GFLOPs": 2 * 1024 * 4096 * 1024 / mm / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class ExpertsHit:
    """Wraps the grouped experts to count experts that received tokens (their weights are read)."""

    def __init__(self, inner):
        self.inner, self.calls, self.hit = inner, 0, 0

    def __call__(self, layer, batch):
        self.calls += 1
        self.hit += sum(1 for n in batch.counts if n)
        return self.inner(layer, batch)


def run_engine(model_dir: Path, prompts: torch.Tensor, new_tokens: int) -> dict[str, float]:
    B, P = prompts.shape
    model = build_model(model_dir, RuntimeShape(max_seqs=B, max_model_len=P + new_tokens))
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    best: dict[str, float] = {}
    for rep in range(2):  # the first round warms up
        hits = ExpertsHit(model.moe.experts)
        for i in range(B):
            engine.add_request(f"{rep}-{i}", prompts[i].tolist(), params)
        t0 = time.perf_counter()
        engine.step()  # every prefill
        t1 = time.perf_counter()
        model.moe.experts = hits
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        t2 = time.perf_counter()
        model.moe.experts = hits.inner
        best = {"prefill_s": t1 - t0, "decode_step_s": (t2 - t1) / steps,
                "experts_hit_per_layer": hits.hit / hits.calls}
    best["model"] = model
    return best


def run_transformers(model_dir: Path, prompts: torch.Tensor, new_tokens: int) -> dict[str, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(prompts[:2], max_new_tokens=4, **kw)  # warm-up
        t_prefill = min(_timed(lambda: model(prompts, use_cache=True)) for _ in range(2))
        t_one = _timed(lambda: model.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kw))
        t_all = _timed(lambda: model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw))
    return {"prefill_s": t_prefill, "decode_step_s": (t_all - t_one) / (new_tokens - 1)}


def roofline(model, batch: int, context: int, experts_hit: float, machine: dict[str, float]) -> dict[str, float]:
    """Bytes a decode step must read and FLOPs it must do, at the measured rates."""
    cfg = model.cfg
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    attn = sum(lw.attn.wqkv.numel() + lw.attn.wo.numel() for lw in model.dense.layers)
    router = sum(lw.router.numel() for lw in model.dense.layers if lw.router is not None)
    expert = 3 * D * cfg.expert_intermediate_size
    kv_bytes = batch * L * 2 * cfg.num_kv_heads * context * cfg.head_dim * 4
    weight_bytes = 4 * (attn + router + V * D + L * experts_hit * expert)
    flops = 2 * batch * (attn + router + V * D + L * cfg.top_k * expert)
    flops += batch * L * 4 * cfg.num_heads * context * cfg.head_dim
    t_mem = (weight_bytes + kv_bytes) / (machine["copy_GBps"] * 1e9)
    t_flop = flops / (machine["matmul_GFLOPs"] * 1e9)
    return {"bytes_MB": (weight_bytes + kv_bytes) / 1e6, "GFLOP": flops / 1e9, "t_mem_ms": t_mem * 1e3,
            "t_flop_ms": t_flop * 1e3, "roofline_ms": max(t_mem, t_flop) * 1e3}


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(BenchCoreSettings, argv, __doc__.splitlines()[0])
    torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "model", SPEC)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, SPEC.vocab, (s.batch, s.prompt_len), generator=g)
        machine = measure_machine(s.threads)
        ours = run_engine(model_dir, prompts, s.new_tokens)
        theirs = run_transformers(model_dir, prompts, s.new_tokens)
        ds_dir = write_tiny_model(Path(tmp) / "deepseek", DEEPSEEK_SPEC)
        ds_ours = run_engine(ds_dir, prompts, s.new_tokens)
        ds_ours.pop("model")
        ds_theirs = run_transformers(ds_dir, prompts, s.new_tokens)
        machine2 = measure_machine(s.threads)
    machine = {k: max(machine[k], machine2[k]) for k in machine}
    context = s.prompt_len + s.new_tokens // 2  # the mean context over the decode steps
    roof = roofline(ours.pop("model"), s.batch, context, ours["experts_hit_per_layer"], machine)
    report(s, machine, ours, theirs, roof, ds_ours, ds_theirs)
    if s.profile:
        print(profile_table(s))
    if s.json_path:
        report_json = {"machine": machine, "engine": ours, "transformers": theirs, "roofline": roof,
                       "deepseek_v3": {"engine": ds_ours, "transformers": ds_theirs}}
        s.json_path.write_text(json.dumps(report_json, indent=2))
    return 0


def profile_table(s: BenchCoreSettings) -> str:
    """The split of the engine's decode step at the benchmark's batch and prompt length."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "model", SPEC)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, SPEC.vocab, (s.batch, s.prompt_len), generator=g).tolist()
        steps = max(4, (s.new_tokens - 8) // 2)
        runtime = RuntimeShape(max_seqs=s.batch, max_model_len=s.prompt_len + 2 * steps + 8)
        engine = Engine(build_model(model_dir, runtime))
        split = decode_split(engine, prompts, SamplingParams(max_new_tokens=2 * steps + 6, ignore_eos=True), steps)
    return split.table(f"engine decode step (batch {s.batch}, context {s.prompt_len}+)")


def report(s: BenchCoreSettings, machine, ours, theirs, roof, ds_ours, ds_theirs) -> None:
    B, P = s.batch, s.prompt_len
    rows = [
        ("prefill tokens/s", B * P / ours["prefill_s"], B * P / theirs["prefill_s"]),
        ("decode tokens/s", B / ours["decode_step_s"], B / theirs["decode_step_s"]),
        ("DSv3 prefill tok/s", B * P / ds_ours["prefill_s"], B * P / ds_theirs["prefill_s"]),
        ("DSv3 decode tok/s", B / ds_ours["decode_step_s"], B / ds_theirs["decode_step_s"]),
    ]
    print(f"bench-core: Mixtral layout D=512 F=1024 E=16 top-2 L=4; batch {B}, prompt {P}, {s.new_tokens} new; "
          f"{s.threads} torch threads, fp32")
    print(f"machine: copy {machine['copy_GBps']:.1f} GB/s, fp32 matmul {machine['matmul_GFLOPs']:.0f} GFLOP/s")
    print(f"{'':18} {'moemesh':>10} {'transformers':>13} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:18} {a:10.0f} {b:13.0f} {a / b:6.2f}x")
    step_ms = ours["decode_step_s"] * 1e3
    print(f"decode step: {step_ms:.1f} ms; reads {roof['bytes_MB']:.0f} MB "
          f"({ours['experts_hit_per_layer']:.1f} experts/layer hit) -> {roof['t_mem_ms']:.1f} ms at copy bandwidth; "
          f"{roof['GFLOP']:.2f} GFLOP -> {roof['t_flop_ms']:.1f} ms")
    print(f"roofline (the larger): {roof['roofline_ms']:.1f} ms; "
          f"achieved {roof['roofline_ms'] / step_ms:.0%} of roofline")


if __name__ == "__main__":
    sys.exit(main())
