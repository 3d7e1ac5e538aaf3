"""Operator tools behind `moemesh placement set|show`: gRPC calls to a running coordinator.

Every RPC carries a deadline. gRPC failures become moemesh errors with the coordinator's message,
so the CLI prints one clear line.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import torch

from moemesh.errors import InvalidRequestError, MoemeshError, UnavailableError
from moemesh.mesh.placement_file import dump_placement, load_placement
from moemesh.mesh.placement_wire import placement_from_proto, placement_to_proto
from moemesh.rpc import channel
from moemesh.status import NOT_YET, error_class_for
from moemesh.tensor_wire import from_proto
from moemesh.tls import TlsFiles
from moemesh.v1 import coordinator_pb2 as pb
from moemesh.v1 import coordinator_pb2_grpc as pb_grpc


async def get_placement(target: str, timeout_s: float, tls: TlsFiles | None = None) -> pb.GetPlacementResponse:
    """The coordinator's placement in force and its load statistics."""
    async with channel(target, tls) as ch:
        try:
            return await pb_grpc.CoordinatorStub(ch).GetPlacement(pb.GetPlacementRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, target, "GetPlacement") from None


async def set_placement(target: str, path: Path, expected_epoch: int, timeout_s: float,
                        tls: TlsFiles | None = None) -> pb.Placement:
    """Publish the placement in `path` (YAML / JSON); returns it as published, with its epoch.

    The current placement supplies the world generation, the MoE layer ids (for the file's
    `experts` shape) and the default world size. With mTLS the certificate must have the admin role.
    """
    async with channel(target, tls) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        try:
            current = (await stub.GetPlacement(pb.GetPlacementRequest(), timeout=timeout_s)).placement
            layer_ids = [lp.layer for lp in current.layers]
            placement = load_placement(path, layer_ids, default_world_size=current.world_size)
            request = pb.SetPlacementRequest(
                placement=placement_to_proto(placement, world_generation=current.world_generation),
                expected_epoch=expected_epoch,
            )
            return (await stub.SetPlacement(request, timeout=timeout_s)).placement
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, target, "SetPlacement") from None


def rpc_error(exc: grpc.aio.AioRpcError, target: str, rpc: str) -> MoemeshError:
    """A one-line typed error (the table in moemesh.status) for a failed RPC to the coordinator at
    `target`; DEADLINE_EXCEEDED counts as unavailable, codes outside the table as MoemeshError."""
    code = exc.code()
    kind = UnavailableError if code in NOT_YET else error_class_for(code) or MoemeshError
    if issubclass(kind, UnavailableError):
        return kind(f"coordinator {target}: {rpc} failed: {code.name}: {exc.details()}")
    return kind(f"coordinator {target} rejected {rpc}: {code.name}: {exc.details()}")


def format_placement(resp: pb.GetPlacementResponse) -> str:
    """Human-readable table: per MoE layer, expert -> ranks and its share of the routed tokens.
    A shard group prints as its ranks joined by '+' in shard order (2+5: shard 0 on rank 2)."""
    p = resp.placement
    lines = [
        f"placement epoch {p.epoch} ({p.origin or 'unknown'}), world generation {p.world_generation}, "
        f"{p.world_size} ranks; load window: {resp.window_tokens} tokens"
    ]
    counts = _counts(resp)
    for i, lp in enumerate(p.layers):
        row = counts[i] if counts is not None and i < counts.shape[0] else None
        total = int(row.sum()) if row is not None else 0
        lines.append(f"layer {lp.layer}")
        lines.append(f"  {'expert':>6}  {'ranks':<16} {'tokens':>10}  {'share':>6}")
        for e, slots in enumerate(lp.experts):
            n = int(row[e]) if row is not None and e < row.shape[0] else 0
            share = f"{100.0 * n / total:5.1f}%" if total else "     -"
            ranks = ",".join([*(str(r) for r in slots.ranks),
                              *("+".join(str(r) for r in g.ranks) for g in slots.shard_groups)])
            lines.append(f"  {e:>6}  {ranks:<16} {n:>10}  {share:>6}")
    return "\n".join(lines + _link_table(resp))


def _link_table(resp: pb.GetPlacementResponse) -> list[str]:
    """Token copies per link (source rank -> destination rank), all MoE layers together."""
    if not resp.HasField("link_counts"):
        return []
    links = from_proto(resp.link_counts).sum(dim=0)  # (R, R)
    R = links.shape[0]
    lines = ["link load (token copies, source rank -> destination rank; the diagonal stays on its device)",
             "  " + " " * 6 + "".join(f"{'->' + str(d):>10}" for d in range(R))]
    for s in range(R):
        lines.append(f"  {s:>6}" + "".join(f"{int(links[s, d]):>10}" for d in range(R)))
    return lines


def placement_yaml(resp: pb.GetPlacementResponse) -> str:
    """The placement in force as a placement file (loads back with `placement set`)."""
    return dump_placement(placement_from_proto(resp.placement))


def _counts(resp: pb.GetPlacementResponse) -> torch.Tensor | None:
    if not resp.HasField("expert_counts"):
        return None
    counts = from_proto(resp.expert_counts)
    return counts if counts.dim() == 2 else None


def trace_json(resp: pb.GetPlacementResponse) -> str:
    """The coordinator's measured routing window as a planner trace (moemesh.planner.traffic)."""
    from moemesh.planner.traffic import dump_trace, from_counts

    counts = _counts(resp)
    if counts is None or resp.window_tokens == 0:
        raise InvalidRequestError("the coordinator has measured no routed tokens yet; serve some requests first")
    top_k = max(1, round(int(counts[0].sum()) / resp.window_tokens))  # copies per token
    layers = [lp.layer for lp in resp.placement.layers]
    if resp.HasField("source_expert_counts"):  # measured per source rank: [R, L, E]
        traffic = from_counts(from_proto(resp.source_expert_counts), top_k=top_k, layer_ids=layers)
    else:
        traffic = from_counts(counts, top_k=top_k, sources=resp.placement.world_size, layer_ids=layers)
    return dump_trace(traffic)
