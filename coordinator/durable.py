"""The coordinator's durable state: what a restarted coordinator needs to resume the mesh.

`Snapshot` is membership (coordinator.membership.Record: generation, registrations, members,
leavers, a reported loss), the current world's first epoch and unservable reason, the placement
in force (its ranks are the current generation's; with the groups placed beyond memory), and the
port of the data plane's TCPStore (re-hosted on the same port, so the workers' rendezvous address
stays valid). The next epoch number is derived: the placement's epoch + 1.

One representation: the placement is written in the placement-file form
(moemesh.mesh.placement_file.dump_placement, the `layers` shape) with its epoch and origin, and
read back with placement_from_dict; `decode(encode(s)) == s`. `encode`/`decode` are pure; `write`
replaces the file atomically (a temporary file in the same folder, then rename), so a coordinator
killed mid-write leaves the previous snapshot whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from coordinator.membership import Record, WorkerInfo
from coordinator.recovery import Forced
from moemesh.errors import ConfigError, InvalidRequestError
from moemesh.mesh.placement import Placement
from moemesh.mesh.placement_file import dump_placement, placement_from_dict

VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """Everything a restarted coordinator restores (see the module docstring)."""

    store_port: int
    membership: Record
    world_epoch: int = 0  # the current world's first placement epoch (World.placement_epoch)
    unservable_reason: str = ""
    placement: Placement | None = None  # the epoch in force (for the current generation); None before a world
    forced: Forced = ()  # groups of `placement` placed beyond a rank's memory

    @property
    def next_epoch(self) -> int:
        return self.placement.epoch + 1 if self.placement is not None else 1


def encode(s: Snapshot) -> str:
    """The snapshot as JSON text."""
    m = s.membership
    doc: dict[str, Any] = {
        "version": VERSION,
        "store_port": s.store_port,
        "generation": m.generation,
        "registered": [asdict(w) for w in m.registered],
        "members": [asdict(w) for w in m.members],
        "leaving": list(m.leaving),
        "broken": m.broken,
        "world_epoch": s.world_epoch,
        "unservable_reason": s.unservable_reason,
        "placement": None if s.placement is None else yaml.safe_load(dump_placement(s.placement)),
        "forced": [[layer, expert, list(group)] for layer, expert, group in s.forced],
    }
    return json.dumps(doc, indent=1)


def decode(text: str, source: str = "state file") -> Snapshot:
    """A snapshot from `encode`'s text; ConfigError naming `source` when it is not one."""
    try:
        doc = json.loads(text)
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r}, expected {VERSION}")
        membership = Record(
            generation=int(doc["generation"]),
            registered=tuple(WorkerInfo(**w) for w in doc["registered"]),
            members=tuple(WorkerInfo(**w) for w in doc["members"]),
            leaving=tuple(str(w) for w in doc["leaving"]),
            broken=bool(doc["broken"]),
        )
        raw = doc["placement"]
        placement = None
        if raw is not None:
            placement = replace(placement_from_dict(raw, (), source=source), epoch=int(raw["epoch"]),
                                origin=str(raw["origin"]))
        snapshot = Snapshot(
            store_port=int(doc["store_port"]), membership=membership, world_epoch=int(doc["world_epoch"]),
            unservable_reason=str(doc["unservable_reason"]), placement=placement,
            forced=tuple((int(layer), int(expert), tuple(int(r) for r in group))
                         for layer, expert, group in doc["forced"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, InvalidRequestError) as exc:
        raise ConfigError(f"{source}: not a coordinator state file: {exc}") from exc
    _check(snapshot, source)
    return snapshot


def _check(s: Snapshot, source: str) -> None:
    m = s.membership
    if not 0 <= s.store_port <= 65535:
        raise ConfigError(f"{source}: store_port {s.store_port} is not a port")
    if (m.generation > 0) != (s.placement is not None) or (m.generation > 0) != bool(m.members):
        raise ConfigError(f"{source}: generation {m.generation} with {len(m.members)} members and "
                          f"{'a' if s.placement is not None else 'no'} placement")
    if s.placement is not None and s.placement.world_size != len(m.members):
        raise ConfigError(f"{source}: the placement has {s.placement.world_size} ranks, the world "
                          f"{len(m.members)} members")


def read(path: Path) -> Snapshot | None:
    """The snapshot in `path`; None when there is no such file (a first start)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the state file {path}: {exc}") from exc
    return decode(text, str(path))


def write(path: Path, s: Snapshot) -> None:
    """Replace `path` with `s` atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(encode(s))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
