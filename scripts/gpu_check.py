"""`PYTHONPATH=. python3 scripts/gpu_check.py OUT`: everything moemesh needs a GPU to verify, in one run
(about a minute plus start-up on one H200). Writes OUT/gpu-check.md (tables) and OUT/gpu-check.json after
every check, with the checks not finished yet listed, so a run cut short still reports what it did.

(a) the engine in fp32 on the device against fp32 on the CPU: the verdict, relative logit error <= 1e-4;
    bf16 on the device against the CPU's fp32 for information (greedy tokens, first divergence);
(c) grouped expert matmul time against this card's roofline, both rates measured here;
(d) the paper's model (4 layers, 16 experts, d_model 8192, expert hidden 32768, 16 x 512 heads,
    fp16, random weights, attention included) on one GPU: weights, peak memory, decode-only TPS
    and TPOT for batches 64..1024, each batch prefilled in one step before the timed decode steps;
(b) last, in a subprocess with a timeout and NCCL_DEBUG=WARN: the nccl transport, world of one,
    through the same dispatch/combine code as the mesh; the collective deadline (a stalled
    exchange must raise CollectiveError and abort); with two or more GPUs, the exchange on cuda:1.
`--device cpu --quick` runs the same code at toy sizes (the test suite does, so it cannot rot); on
the CPU the verdict of (a) compares the CPU with itself, and "bf16" is bf16 on the CPU.
Needs only torch, safetensors, tokenizers (and CuPy for (b)): no gRPC, no virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemesh.engine.engine import Engine, EngineSettings, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import MoEModel, RuntimeShape, build_model
from moemesh.model.moe import GroupedExperts
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.settings import option, parse_bool, parse_settings

FP32_TOLERANCE = 1e-4  # relative logit error, fp32 on the device against fp32 on the CPU
NCCL_TIMEOUT_S = 180  # the nccl subprocess; a hang past it is reported, not waited for


@dataclass(frozen=True)
class GpuCheckSettings:
    """Where the results go and what runs; flags only (moemesh.settings: the standard library alone)."""

    ENV_PREFIX: ClassVar[str | None] = None

    results: Path = option("results", "folder for gpu-check.md and gpu-check.json", Path, metavar="OUT")
    device: str = option("--device", "the torch device to check", default="cuda:0")
    quick: bool = option("--quick", "toy sizes (CPU smoke test)", parse_bool, default=False)
    nccl_child: Path | None = option("--nccl-child", argparse.SUPPRESS, Path, default=None)  # check (b)'s subprocess


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


# ---- (a) engine ------------------------------------------------------------------------------
PROMPTS = [[0, 5, 6, 7, 8], [0, 300, 301], [0, *range(10, 40)]]


def relative_logit_error(model: MoEModel, ref: MoEModel, device: str) -> float:
    """max |logits - reference| / max |reference| over every position of the longest prompt."""
    from moemesh.model.layers import Segment, build_attention_plan

    tokens = torch.tensor(PROMPTS[2])  # (T,)
    seg = [Segment(slot=0, offset=0, length=len(tokens), start_pos=0)]
    want = ref.forward(tokens, build_attention_plan([], [], seg, None, "cpu"), torch.arange(len(tokens)))  # (T, V)
    got = model.forward(tokens.to(device), build_attention_plan([], [], seg, None, device),
                        torch.arange(len(tokens), device=device)).float().cpu()  # (T, V)
    return float((got - want).abs().max() / want.abs().max())


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per prompt, the index of the first greedy token that differs (None: all equal)."""
    return [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]


def check_engine(device: str, quick: bool) -> dict:
    """(a) fp32 on the device vs fp32 on the CPU (the verdict); bf16 vs the CPU's fp32 (information)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would cost ~1e-3)
    spec = TinySpec(arch="mixtral", layers=2 if quick else 4, experts=8, top_k=2, hidden=128 if quick else 512,
                    intermediate=256 if quick else 1024, heads=4, kv_heads=2, vocab=512, seed=0)
    params = SamplingParams(max_new_tokens=8 if quick else 32, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "m", spec)
        build = lambda dtype, dev: build_model(model_dir, RuntimeShape(max_seqs=4, max_model_len=128,
                                                                      dtype=dtype, device=dev))
        ref = build(torch.float32, "cpu")
        want = generate(Engine(ref), PROMPTS, params)
        out: dict[str, dict] = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = build(dtype, device)
            got = generate(Engine(model), PROMPTS, params)
            out[str(dtype).removeprefix("torch.")] = {
                "dtype": str(model.dense.embed.dtype),  # what ran, not what was asked
                "relative_logit_error": relative_logit_error(model, ref, device),
                "greedy_tokens_equal": sum(x == y for p, q in zip(want, got) for x, y in zip(p, q)),
                "greedy_tokens_total": sum(len(p) for p in want),
                "first_difference_per_prompt": first_divergence(want, got)}
            del model
    rel = float(out["float32"]["relative_logit_error"])
    return {"verdict": "pass" if rel <= FP32_TOLERANCE else "FAIL", "tolerance": FP32_TOLERANCE,
            "verdict_compares": f"fp32 on {device} against fp32 on cpu"
            + (" (the CPU against itself: only shows the code runs)" if device == "cpu" else ""),
            "fp32": out["float32"], "bf16_for_information": out["bfloat16"]}


# ---- (c) grouped matmul against the roofline ---------------------------------------------------
def copy_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second of memory traffic of a copy of `nbytes`: each byte is read and written."""
    return 2 * nbytes / seconds


def roofline_seconds(traffic_bytes: int, flops: int, bandwidth: float, flop_rate: float) -> tuple[float, str]:
    """The least time for the work on this card, and which rate bounds it."""
    t_mem, t_flop = traffic_bytes / bandwidth, flops / flop_rate
    return max(t_mem, t_flop), "memory" if t_mem > t_flop else "compute"


def swiglu_cost(tokens: int, D: int, F: int, element_bytes: int) -> tuple[int, int]:
    """(least memory traffic, flops) of one expert's SwiGLU on `tokens` rows: w13 (D, 2F) and w2
    (D, F) read once, the input (tokens, D) read and the output written once."""
    return (3 * D * F + 2 * tokens * D) * element_bytes, 2 * tokens * 3 * D * F


def machine_rates(device: str) -> dict:
    n = 8192 if device.startswith("cuda") else 512
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = timed(lambda: a @ b, device)
    src = torch.empty(2**30 if device.startswith("cuda") else 2**25, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device)
    return {"matmul_TFLOPs": 2 * n**3 / t_mm / 1e12,
            "copy_read_plus_write_GBps": copy_bandwidth(src.numel(), t_copy) / 1e9}


def check_grouped_matmul(device: str, quick: bool, rates: dict) -> list[dict]:
    """(c) one expert's SwiGLU (w13 then w2) at the paper's sizes, 128..8192 tokens."""
    from moemesh.model.moe import ExpertBatch
    from moemesh.model.weights import LayerExperts

    D, F = (256, 1024) if quick else (8192, 32768)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    w13 = torch.randn(1, D, 2 * F, dtype=dtype, device=device) * D**-0.5  # (E, D, 2F)
    w2 = torch.randn(1, D, F, dtype=dtype, device=device) * F**-0.5  # (E, D, F)
    experts = GroupedExperts({0: LayerExperts.stacked((0,), w13, w2)})
    rows = []
    for n in (128, 512, 2048, 8192)[: 2 if quick else 4]:
        batch = ExpertBatch(x=torch.randn(n, D, dtype=dtype, device=device), counts=[n])
        t = timed(lambda batch=batch: experts(0, batch), device)
        traffic, flops = swiglu_cost(n, D, F, torch.finfo(dtype).bits // 8)
        roof, bound = roofline_seconds(traffic, flops, rates["copy_read_plus_write_GBps"] * 1e9,
                                       rates["matmul_TFLOPs"] * 1e12)
        rows.append({"tokens": n, "ms": t * 1e3, "roofline_ms": roof * 1e3, "bound": bound,
                     "fraction_of_roofline": roof / t, "within_1/0.7": t <= roof / 0.7})
    return rows


# ---- (d) the paper's model ---------------------------------------------------------------------
def prefill_budget(batch: int, prompt: int) -> int:
    """The engine's prompt-token budget that admits and prefills the whole batch in one step."""
    return batch * prompt


def weight_bytes(*parts) -> int:
    """Bytes of every distinct tensor in dataclasses / tuples / dicts of them (attention included)."""
    seen: dict[int, int] = {}

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = max(seen.get(x.data_ptr(), 0), x.nbytes)  # tied / view: counted once
        elif is_dataclass(x):
            for f in fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, (tuple, list)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    for part in parts:
        walk(part)
    return sum(seen.values())


def decode_tpot(model: MoEModel, batch: int, prompt: int, new: int, device: str) -> tuple[float, int]:
    """(seconds per decode step, decode steps timed) with `batch` sequences decoding in every
    timed step; the prefill step is not timed."""
    vocab = model.cfg.vocab_size
    engine = Engine(model, EngineSettings(max_batched_tokens=prefill_budget(batch, prompt), max_waiting=batch))
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    for i in range(batch):
        engine.add_request(str(i), [(i + j) % vocab for j in range(prompt)], params)
    engine.step()  # every prompt prefilled, and its first token out
    assert engine.num_running == batch and engine.num_waiting == 0, "the batch was not prefilled in one step"
    sync(device)
    start, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()  # batch sequences decoding, every step
        steps += 1
    sync(device)
    return (time.perf_counter() - start) / steps, steps


def check_paper_model(device: str, quick: bool) -> dict:
    """(d) decode throughput of the paper's model on one device, random fp16 weights."""
    from dataclasses import replace

    from moemesh.model.random_init import paper_config, random_model

    cfg = paper_config()
    batches: tuple[int, ...] = (64, 128, 256, 512, 1024)
    if quick:
        cfg = replace(cfg, hidden_size=64, expert_intermediate_size=128, head_dim=8, vocab_size=512)
        batches = (4, 8)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    prompt, new = 16, 4 if quick else 16
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runtime = RuntimeShape(max_seqs=max(batches), max_model_len=prompt + new, dtype=dtype, device=device)
    model = random_model(cfg, runtime)
    rows = []
    for b in batches:
        tpot, steps = decode_tpot(model, b, prompt, new, device)
        rows.append({"batch": b, "decode_steps_timed": steps, "tpot_ms": tpot * 1e3, "decode_tps": b / tpot})
    cuda, experts = device.startswith("cuda"), model.moe.experts
    assert isinstance(experts, GroupedExperts), "random_model keeps every expert local"
    return {"dtype": str(dtype), "weight_GB": weight_bytes(model.dense, experts.layers) / 1e9,
            "expert_weight_GB": experts.nbytes / 1e9, "kv_cache_GB": model.cache.nbytes / 1e9,
            "peak_allocated_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "peak_reserved_GB": torch.cuda.max_memory_reserved() / 1e9 if cuda else None, "rows": rows}


# ---- (b) nccl, in a subprocess ------------------------------------------------------------------
def nccl_exchange(device: str) -> dict:
    """AllToAllTransport over NcclCollective (world of one) against LocalTransport, called from a
    fresh thread whose current CUDA device is 0 whatever `device` is (item: cuda:N, N >= 1)."""
    from moemesh.mesh.nccl import NcclCollective, make_unique_id
    from moemesh.mesh.placement import initial_placement
    from moemesh.mesh.transport import AllToAllTransport
    from moemesh.model.moe import GroupedExperts, LocalTransport, MoELayer
    from moemesh.model.routers import SoftmaxTopKRouter
    from moemesh.model.weights import LayerExperts

    E, D, F, T, K = 8, 256, 512, 64, 2
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.bfloat16) * s[-1] ** -0.5
    experts = GroupedExperts({0: LayerExperts.stacked(tuple(range(E)), mk(E, D, 2 * F), mk(E, D, F))})
    router, x = mk(E, D), mk(T, D)
    out: dict = {}

    def run() -> None:  # no torch.cuda.device(...) here on purpose: the collective must not need it
        try:
            collective = NcclCollective(0, 1, make_unique_id(), torch.device(device), timeout_s=60.0)
            try:
                transport = AllToAllTransport(collective, initial_placement(E, [0], 1), device)
                got = MoELayer(SoftmaxTopKRouter(K, True), transport, experts)(0, x, router)  # (T, D)
                want = MoELayer(SoftmaxTopKRouter(K, True), LocalTransport(E), experts)(0, x, router)  # (T, D)
                header = collective.all_gather(torch.tensor([7, 8]))  # (1, 2)
                out.update(tokens=T, max_abs_difference=float((got - want).abs().max()),
                           equal=bool(torch.equal(got, want)), header=header.tolist(),
                           thread_current_device=torch.cuda.current_device())
            finally:
                collective.close()
        except Exception as exc:
            out.update(error=repr(exc), traceback=traceback.format_exc())

    worker = threading.Thread(target=run)  # torch.cuda.current_device() starts at 0 in a new thread
    worker.start()
    worker.join()
    return out


def nccl_deadline(device: str, timeout_s: float = 1.0) -> dict:
    """An exchange stalled behind a long kernel on the compute stream must raise CollectiveError
    within about `timeout_s` and abort the communicator (what survivors of a dead peer see)."""
    from moemesh.mesh.nccl import CollectiveError, NcclCollective, make_unique_id

    collective = NcclCollective(0, 1, make_unique_id(), torch.device(device), timeout_s=timeout_s)
    with torch.cuda.device(device):
        torch.cuda._sleep(int(20 * timeout_s * 2e9))  # ~20 x timeout_s of GPU clock cycles on the compute stream
        pending = collective.all_to_all(torch.zeros(4, 8, device=device))
        start = time.perf_counter()
        try:
            pending.wait()
            return {"raised": False, "verdict": "FAIL: the stalled exchange returned"}
        except CollectiveError as exc:
            waited = time.perf_counter() - start
            return {"raised": "CollectiveError", "message": str(exc), "seconds_to_raise": waited,
                    "aborted": collective.aborted, "verdict": "pass" if waited < 10 * timeout_s else "FAIL: late"}


def nccl_child(device: str, out: Path) -> None:
    """Runs in the subprocess; writes each part's result as soon as it has it."""
    from moemesh.mesh.backend import nccl_unavailable_reason

    results: dict = {}
    why_not = nccl_unavailable_reason(device)
    parts = [] if why_not else [("world_of_one", lambda: nccl_exchange(device)),
                                ("world_of_one_on_cuda_1",
                                 lambda: nccl_exchange("cuda:1") if torch.cuda.device_count() > 1
                                 else {"skipped": "one GPU: cuda:N with N >= 1 cannot be exercised"}),
                                ("deadline", lambda: nccl_deadline(device))]  # last: it aborts a communicator
    if why_not:
        results["skipped"] = why_not
    for key, fn in parts:
        try:
            results[key] = fn()
        except Exception as exc:
            results[key] = {"error": repr(exc), "traceback": traceback.format_exc()}
        out.write_text(json.dumps(results))
    out.write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # an aborted communicator's stream may never drain: do not wait for it at exit


def check_nccl(device: str, results_dir: Path, timeout_s: float = NCCL_TIMEOUT_S) -> dict:
    """(b) in a subprocess with a timeout and NCCL_DEBUG=WARN, so a hang costs only this check."""
    out = results_dir / "nccl-check.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, NCCL_DEBUG="WARN", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, str(results_dir), "--device", device, "--nccl-child", str(out)]
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s)
        status: dict = {"exit_code": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")[-3000:]
        status = {"timed_out_after_s": timeout_s, "output_tail": tail}
    found = json.loads(out.read_text()) if out.exists() else {}
    return {**found, "subprocess": status}


# ---- the run -------------------------------------------------------------------------------------
def to_markdown(results: dict) -> str:
    lines = [f"# gpu-check ({results['device_name']})", "", f"Run: {results['when']}; torch {results['torch']}", "",
             f"Not finished: {', '.join(results['not_finished']) or 'none'}", ""]
    for key, value in results["checks"].items():
        lines += [f"## {key}", "", "```", json.dumps(value, indent=2), "```", ""]
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2))
    (out / "gpu-check.md").write_text(to_markdown(results))


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(GpuCheckSettings, argv, (__doc__ or "").splitlines()[0])
    device = s.device
    if s.nccl_child:
        nccl_child(device, s.nccl_child)
    s.results.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    checks: dict = {}
    steps = [("a_engine_fp32_verdict_bf16_information", lambda: check_engine(device, s.quick)),
             ("machine_rates", lambda: machine_rates(device)),
             ("c_grouped_matmul_vs_roofline",
              lambda: check_grouped_matmul(device, s.quick, checks["machine_rates"])),
             ("d_paper_model_one_gpu", lambda: check_paper_model(device, s.quick)),
             ("b_nccl_subprocess", lambda: check_nccl(device, s.results))]  # last: a hang costs only itself
    not_finished = [key for key, _ in steps]
    seconds: dict[str, float] = {}
    results = {"device_name": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
               "not_finished": not_finished, "seconds": seconds, "checks": checks}
    write(results, s.results)
    for key, fn in steps:
        print(f"gpu-check: {key} ...", flush=True)
        start = time.perf_counter()
        try:
            checks[key] = fn()
        except Exception as exc:
            checks[key] = {"error": repr(exc), "traceback": traceback.format_exc()}
        if not (isinstance(checks[key], dict) and "timed_out_after_s" in checks[key].get("subprocess", {})):
            not_finished.remove(key)
        seconds[key] = round(time.perf_counter() - start, 1)
        print(json.dumps(checks[key])[:2000], flush=True)
        write(results, s.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
