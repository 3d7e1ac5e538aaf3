"""`make gpu-check RESULTS=DIR`: everything moemesh needs a GPU to verify, in one run (< 8 min on
one H200). Writes DIR/gpu-check.md (tables) and DIR/gpu-check.json.

(a) the engine on the GPU in bf16 against the CPU fp32 engine: relative logit error, greedy tokens;
(b) the nccl transport, world of one, through the same dispatch/combine code as the mesh;
(c) grouped expert matmul time against this card's roofline, both rates measured here;
(d) the paper's model (4 layers, 16 experts, d_model 8192, expert hidden 32768, 16 x 512 heads,
    fp16, random weights) on one GPU: memory, decode TPS and TPOT for batches 64..1024.
`--device cpu --quick` runs the same code at toy sizes (the test suite does, so it cannot rot).
Needs only torch, safetensors, tokenizers (and CuPy for (b)): no gRPC, no virtualenv.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemesh.engine.engine import Engine, generate  # noqa: E402
from moemesh.engine.sampling import SamplingParams  # noqa: E402
from moemesh.model.model import RuntimeShape, build_model  # noqa: E402
from moemesh.model.tiny import TinySpec, write_tiny_model  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 5) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def check_engine(device: str, quick: bool) -> dict:
    """(a) bf16 on the device vs fp32 on the CPU, same checkpoint and prompts."""
    spec = TinySpec(arch="mixtral", layers=2 if quick else 4, experts=8, top_k=2, hidden=128 if quick else 512,
                    intermediate=256 if quick else 1024, heads=4, kv_heads=2, vocab=512, seed=0)
    prompts = [[0, 5, 6, 7, 8], [0, 300, 301], [0] + list(range(10, 40))]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "m", spec)
        ref = build_model(model_dir, RuntimeShape(max_seqs=4, max_model_len=128))
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        dev = build_model(model_dir, RuntimeShape(max_seqs=4, max_model_len=128, dtype=dtype, device=device))
        from moemesh.model.layers import Segment, build_attention_plan

        tokens = torch.tensor(prompts[2])
        seg = [Segment(slot=0, offset=0, length=len(tokens), start_pos=0)]
        want = ref.forward(tokens, build_attention_plan([], [], seg, None, "cpu"), torch.arange(len(tokens)))
        got = dev.forward(tokens.to(device), build_attention_plan([], [], seg, None, device),
                          torch.arange(len(tokens), device=device)).cpu()
        rel = float((got - want).abs().max() / want.abs().max())
        params = SamplingParams(max_new_tokens=32, ignore_eos=True)
        a = generate(Engine(ref), prompts, params)
        b = generate(Engine(dev), prompts, params)
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    total = sum(len(p) for p in a)
    first_diff = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    return {"dtype": str(dtype), "relative_logit_error": rel, "passes_1e-2": rel <= 1e-2,
            "greedy_tokens_equal": same, "greedy_tokens_total": total, "first_difference_per_prompt": first_diff}


def check_nccl(device: str, quick: bool) -> dict:
    """(b) AllToAllTransport over NcclCollective (world of one) vs LocalTransport."""
    from moemesh.mesh.backend import nccl_unavailable_reason

    why_not = nccl_unavailable_reason(device)
    if why_not:
        return {"skipped": why_not}
    from moemesh.mesh.nccl import NcclCollective, make_unique_id
    from moemesh.mesh.placement import initial_placement
    from moemesh.mesh.transport import AllToAllTransport
    from moemesh.model.moe import GroupedExperts, LocalTransport, MoELayer, SoftmaxTopKRouter
    from moemesh.model.weights import LayerExperts

    E, D, F, T, K = 8, 256, 512, 64, 2
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.bfloat16) * s[-1] ** -0.5  # noqa: E731
    experts = GroupedExperts({0: LayerExperts.stacked(tuple(range(E)), mk(E, D, 2 * F), mk(E, D, F))})
    router, x = mk(E, D), mk(T, D)
    collective = NcclCollective(0, 1, make_unique_id(), torch.device(device))
    transport = AllToAllTransport(collective, initial_placement(E, [0], 1), device)
    got = MoELayer(SoftmaxTopKRouter(K, True), transport, experts)(0, x, router)
    want = MoELayer(SoftmaxTopKRouter(K, True), LocalTransport(E), experts)(0, x, router)
    sync(device)
    collective.close()
    return {"tokens": T, "max_abs_difference": float((got - want).abs().max()), "equal": bool(torch.equal(got, want))}


def machine_rates(device: str) -> dict:
    n = 8192 if device.startswith("cuda") else 512
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = timed(lambda: a @ b, device)
    src = torch.empty(2**30 if device.startswith("cuda") else 2**25, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device)
    return {"matmul_TFLOPs": 2 * n**3 / t_mm / 1e12, "copy_read_GBps": src.numel() / t_copy / 1e9}


def check_grouped_matmul(device: str, quick: bool, rates: dict) -> list[dict]:
    """(c) one expert's SwiGLU (w13 then w2) at the paper's sizes, 128..8192 tokens."""
    from moemesh.model.moe import ExpertBatch, GroupedExperts
    from moemesh.model.weights import LayerExperts

    D, F = (256, 1024) if quick else (8192, 32768)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    experts = GroupedExperts({0: LayerExperts.stacked((0,), torch.randn(1, D, 2 * F, dtype=dtype, device=device) * D**-0.5,
                                              torch.randn(1, D, F, dtype=dtype, device=device) * F**-0.5)})
    rows = []
    for n in (128, 512, 2048, 8192)[: 2 if quick else 4]:
        batch = ExpertBatch(x=torch.randn(n, D, dtype=dtype, device=device), counts=[n])
        t = timed(lambda: experts(0, batch), device)
        weight_bytes = 3 * D * F * torch.finfo(dtype).bits // 8
        flops = 2 * n * 3 * D * F
        t_mem = weight_bytes / (rates["copy_read_GBps"] * 1e9)
        t_flop = flops / (rates["matmul_TFLOPs"] * 1e12)
        roof = max(t_mem, t_flop)
        rows.append({"tokens": n, "ms": t * 1e3, "roofline_ms": roof * 1e3, "bound": "memory" if t_mem > t_flop else "compute",
                     "fraction_of_roofline": roof / t, "within_1/0.7": t <= roof / 0.7})
    return rows


def check_paper_model(device: str, quick: bool) -> dict:
    """(d) decode throughput of the paper's model on one device, random fp16 weights."""
    from dataclasses import replace

    from moemesh.model.random_init import paper_config, random_model

    cfg = paper_config()
    batches = (64, 128, 256, 512, 1024)
    if quick:
        cfg = replace(cfg, hidden_size=64, expert_intermediate_size=128, head_dim=8, vocab_size=512)
        batches = (4, 8)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    prompt, new = 16, 16
    model = random_model(cfg, RuntimeShape(max_seqs=max(batches), max_model_len=prompt + new, dtype=dtype, device=device))
    mem = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    rows = []
    for b in batches:
        engine = Engine(model)
        for i in range(b):
            engine.add_request(str(i), [(i + j) % cfg.vocab_size for j in range(prompt)],
                               SamplingParams(max_new_tokens=new, ignore_eos=True))
        engine.step()  # prefill
        sync(device)
        start, steps = time.perf_counter(), 0
        while engine.has_work:
            engine.step()
            steps += 1
        sync(device)
        tpot = (time.perf_counter() - start) / steps
        rows.append({"batch": b, "tpot_ms": tpot * 1e3, "decode_tps": b / tpot})
    weights = sum(t.nbytes for t in (model.dense.embed, model.dense.lm_head)) + model.moe.experts.nbytes
    return {"weight_GB": weights / 1e9, "allocated_GB": mem / 1e9, "kv_cache_GB": model.cache.nbytes / 1e9, "rows": rows}


def to_markdown(results: dict) -> str:
    lines = [f"# gpu-check ({results['device_name']})", "", f"Run: {results['when']}; torch {results['torch']}", ""]
    for key, value in results["checks"].items():
        lines += [f"## {key}", "", "```", json.dumps(value, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU smoke test)")
    args = ap.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    device = args.device
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    results = {"device_name": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "checks": {}}
    steps = [("a_engine_bf16_vs_cpu_fp32", lambda: check_engine(device, args.quick)),
             ("b_nccl_world_of_one", lambda: check_nccl(device, args.quick)),
             ("machine_rates", lambda: machine_rates(device)),
             ("c_grouped_matmul_vs_roofline", lambda: check_grouped_matmul(device, args.quick, results["checks"]["machine_rates"])),
             ("d_paper_model_one_gpu", lambda: check_paper_model(device, args.quick))]
    for key, fn in steps:
        print(f"gpu-check: {key} ...", flush=True)
        try:
            results["checks"][key] = fn()
        except Exception as exc:  # record and go on: one failing check must not hide the others
            results["checks"][key] = {"error": repr(exc), "traceback": traceback.format_exc()}
        print(json.dumps(results["checks"][key])[:2000], flush=True)
        (args.results / "gpu-check.json").write_text(json.dumps(results, indent=2))
        (args.results / "gpu-check.md").write_text(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
