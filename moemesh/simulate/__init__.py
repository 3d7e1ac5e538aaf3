"""Capacity planning: a cost model of MoE serving deployments, from FLOPs, bytes and links.

- `shapes`: ModelShape (the model's sizes: GQA or MLA attention, dense layers first, shared and
  routed experts, grouped routing; presets `paper` and `deepseek-v3`), Workload (decode / prefill).
- `hardware`: DeviceProfile (rates and host overheads of one device), `H100_SXM`, the CPU profile
  built from measurements, `profile_from_gpu_check` (a GPU check's measured rates).
- `timeline`: the per-layer schedule of compute and exchanges over micro-batches (overlap).
- `step_cost`: `parse_deployment` (ep<N>, colocated<k>, tp<T>pp<P>) and `predict` -> Prediction
  (per-layer timeline, step time, TPOT, TPS), using moemesh.planner's placement and link loads.
- `paper`: the paper's table beside our predictions, and where its numbers disagree.
- `sweep`: EP scaling from 16 to 1024 devices, and its chart.
- `grouped`: group-limited routing's effect on cross-node traffic per EP degree (DeepSeek-V3).
- `measure`, `cpu_check` (not pure): this machine's rates, and the prediction of a real CPU mesh's
  decode step against its measurement.
- `cli`: `moemesh simulate` (add_simulate_command).
Pure modules (shapes, hardware, timeline, step_cost, paper, sweep, grouped) import neither torch nor gRPC.
"""
