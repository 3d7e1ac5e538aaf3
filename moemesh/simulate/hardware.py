"""Device profiles: what one device sustains. Links come from the planner's Topology. Pure.

Constants and where they come from (docs/benchmarks.md repeats them):

- H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet): 989 TFLOP/s dense FP16/BF16 tensor core
  (1,979 with 2:4 sparsity), 3.35 TB/s HBM3, 80 GB. The planner's `paper-16xh100` topology
  carries the paper's links (NVLink 400 GB/s per device, InfiniBand 200 GB/s per node, 7.5 us /
  3 us latency); the datasheet's NVLink 4 is 900 GB/s per GPU (both directions) and one NDR
  InfiniBand port is 50 GB/s, so the paper's figures are not the datasheet's (we use the paper's).
- Per-peer message cost of an all-to-all on GPUs, 0.47 us: DeepEP's low-latency dispatch takes
  77 us at EP 8 and 194 us at EP 256 (deepseek-ai/DeepEP README, ../shared/field-notes.md):
  (194 - 77) us / (256 - 8) peers.
- GPU host overheads are 0: the GPU rows are a roofline (CUDA graphs, perfect kernels), i.e. an
  upper bound on TPS and a lower bound on TPOT for the hardware.
- CPU (this machine): every rate is measured (moemesh.simulate.measure) under the same number
  of processes as the mesh it predicts; `FIELD_NOTES_CPU` holds the field notes' figures for
  `moemesh simulate --topology local` without --measure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from moemesh.errors import ConfigError
from moemesh.planner.topology import LinkSpec, Topology, local_topology


@dataclass(frozen=True)
class DeviceProfile:
    """Sustained rates of one device and the host-side costs around its kernels (seconds)."""

    name: str
    flops_per_s: float  # dense matmul FLOP/s at the served dtype
    mem_bytes_per_s: float  # bytes/s streamed from device memory (weights, KV cache)
    memory_bytes: float  # device memory
    step_overhead_s: float = 0.0  # per forward step: embedding, scheduling, sampling
    layer_overhead_s: float = 0.0  # per decoder layer: norms, attention and routing bookkeeping
    expert_overhead_s: float = 0.0  # per expert that receives tokens in a layer
    header_s: float = 0.0  # per step: the ranks' agreement collective (lockstep header)
    per_peer_s: float = 0.0  # per destination an all-to-all sends to (message setup)
    serving_overhead_s: float = 0.0  # per step of a mesh worker beyond its engine (RPC threads, runner)
    source: str = ""

    def roofline_s(self, flops: float, bytes_: float) -> float:
        """Seconds for work that needs `flops` and streams `bytes_`: the larger of the two."""
        return max(flops / self.flops_per_s, bytes_ / self.mem_bytes_per_s)


H100_SXM = DeviceProfile(
    name="H100 SXM5", flops_per_s=989e12, mem_bytes_per_s=3.35e12, memory_bytes=80e9, per_peer_s=0.47e-6,
    source="NVIDIA H100 datasheet (989 TFLOP/s dense FP16, 3.35 TB/s HBM3, 80 GB); DeepEP per-peer cost",
)

# ../shared/field-notes.md: fp32 matmul 42-74 GFLOP/s one thread; memory copy ~10 GB/s into an
# existing buffer; a tiny gloo collective 0.12-0.25 ms. Host overheads as measured by
# moemesh.simulate.measure.measure_overheads on the default tiny model (about 1.5 ms per layer).
FIELD_NOTES_CPU = DeviceProfile(
    name="2-vCPU EPYC, one fp32 thread", flops_per_s=50e9, mem_bytes_per_s=4e9, memory_bytes=12 * 2**30,
    step_overhead_s=0.5e-3, layer_overhead_s=1.5e-3, expert_overhead_s=40e-6, header_s=0.25e-3,
    source="../shared/field-notes.md and measure_overheads on the default tiny model",
)


def profile_from_gpu_check(path: str | Path, base: DeviceProfile = H100_SXM) -> DeviceProfile:
    """`base` with the matmul rate and memory bandwidth a GPU check measured
    (scripts/gpu_check.py writes them to gpu-check.json under checks.machine_rates)."""
    data = json.loads(Path(path).read_text())
    rates = data.get("checks", {}).get("machine_rates") or {}
    if "matmul_TFLOPs" not in rates or "copy_read_GBps" not in rates:
        raise ConfigError(f"{path}: no checks.machine_rates with matmul_TFLOPs and copy_read_GBps")
    device = data.get("device_name") or data.get("device") or "GPU"
    return replace(base, name=f"{device} (measured by the GPU check)", flops_per_s=rates["matmul_TFLOPs"] * 1e12,
                   mem_bytes_per_s=rates["copy_read_GBps"] * 1e9, source=f"measured: {path}")


def profile_for(topology: Topology) -> DeviceProfile:
    """The default profile of a topology: this CPU for `local*`, else an H100."""
    return FIELD_NOTES_CPU if topology.name.startswith("local") else H100_SXM


def cpu_profile(rates, overheads, serving_overhead_s: float = 0.0) -> DeviceProfile:
    """A CPU profile from moemesh.simulate.measure's CpuRates and Overheads."""
    return DeviceProfile(
        name=f"this CPU, {rates.processes} processes x 1 thread (measured)", flops_per_s=rates.matmul_flops_per_s,
        mem_bytes_per_s=rates.stream_bytes_per_s, memory_bytes=FIELD_NOTES_CPU.memory_bytes,
        step_overhead_s=overheads.per_step_s, layer_overhead_s=overheads.per_layer_s,
        expert_overhead_s=overheads.per_expert_s, header_s=rates.gather_latency_s,
        serving_overhead_s=serving_overhead_s,
        source="measured in this run (moemesh.simulate.measure)",
    )


def cpu_topology(rates, devices: int) -> Topology:
    """`devices` worker processes on this machine, the loopback link as gloo measured it."""
    link = LinkSpec(bandwidth_bytes_per_s=rates.a2a_bytes_per_s, latency_s=rates.a2a_latency_s)
    return replace(local_topology(devices), name=f"local-{devices} (measured)", intra=link, inter=link,
                   device_flops_per_s=rates.matmul_flops_per_s)
