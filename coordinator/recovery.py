"""The placement of a re-formed world. Pure: no gRPC, no torch.distributed, no clock.

When the coordinator forms generation g+1 (a member lost, left or restarted; a worker joined),
the ranks change: survivors keep their old rank order and close up, joiners follow. Two
placements come out of it, both for the new world's ranks, both with no gating factors (gating
factors are load-aware corrections for the old world's ranks and traffic; they restart at none):

- `reformed_placement`: the world's first epoch, which every rank loads before the first step, so
  it asks as little loading as it can: every replica on a survivor is kept (renumbered); a shard
  group with a lost member is dropped (its other shards alone compute nothing); an expert left
  with no replica gets one on the new ranks holding the fewest experts (joiners, being empty,
  first; a split expert gets a group of the same size). With redundancy (every expert on two or
  more ranks) a single loss orphans nothing, and nothing needs loading.
- `spread`: the next epoch, which ranks load in the background while serving: every expert back
  to 1 + `redundancy` replica groups on distinct ranks, then whole-expert copies to the ranks that
  hold fewer experts than the fullest rank of their layer (a joiner receives copies), so that
  experts per rank are as even as possible. Also applied to the first world's round-robin
  placement when redundancy is asked for.

Both respect each rank's memory (`Room`: bytes it can hold for expert weights, 0 = no bound). An
orphan that fits nowhere is placed anyway on the rank with the fewest experts (a placement must
cover every expert) and the reason is returned: such a world is unservable (World.unservable_reason).
Copies that do not fit are simply not made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moemesh.mesh.placement import Group, Groups, Placement

RECOVERY = "recovery"  # the contract's origin for a placement made because the world changed
MAX_REASONS = 3  # an unservable reason names this many experts, then counts the rest


@dataclass(frozen=True)
class Room:
    """Per rank of the new world, bytes it can hold for expert weights (0 = unknown: no bound),
    and the bytes of one whole expert of one layer (0 = unknown: nothing is bounded)."""

    per_rank: Sequence[int] = ()
    expert_bytes: int = 0


Forced = tuple[tuple[int, int, Group], ...]  # (layer, expert, group) placed beyond a rank's memory


@dataclass(frozen=True)
class Reformed:
    """The new world's first placement (epoch left as the old one's) and, when some expert fits
    nowhere, why the world cannot serve (empty when it can) and the groups placed anyway beyond
    memory (`forced`, new ranks: pass them back as `drop` when re-forming this world, so that
    they are placed again where there is room)."""

    placement: Placement
    unservable_reason: str = ""
    forced: Forced = ()


class _Draft:
    """A placement being built: per layer, each expert's groups, with per-rank counts kept up to date."""

    def __init__(self, world_size: int, replicas: Mapping[int, Sequence[Groups]], room: Room):
        self.world_size = world_size
        self.room = room
        self.tables: dict[int, list[list[Group]]] = {}
        self.counts: dict[int, list[int]] = {}  # layer -> per rank, experts held (whole or a shard)
        self.total = [0] * world_size  # per rank, experts held over all layers
        self.used = [0.0] * world_size  # per rank, bytes of expert weights held
        for layer, table in replicas.items():
            self.tables[layer] = [[] for _ in table]
            self.counts[layer] = [0] * world_size
            for expert, groups in enumerate(table):
                for group in groups:
                    self.add(layer, expert, group)

    def add(self, layer: int, expert: int, group: Group) -> None:
        self.tables[layer][expert].append(group)
        for r in group:
            self.counts[layer][r] += 1
            self.total[r] += 1
            self.used[r] += self.room.expert_bytes / len(group)

    def holders(self, layer: int, expert: int) -> set[int]:
        return {r for g in self.tables[layer][expert] for r in g}

    def fits(self, rank: int, group_size: int) -> bool:
        """Whether `rank` has room for 1/group_size of one more expert."""
        cap = self.room.per_rank[rank] if rank < len(self.room.per_rank) else 0
        return cap <= 0 or self.used[rank] + self.room.expert_bytes / group_size <= cap

    def fewest(self, layer: int, size: int, exclude: set[int], need_room: bool = True) -> Group | None:
        """`size` distinct ranks outside `exclude` with the fewest experts of `layer` (then the
        fewest overall, then the lowest rank), each with room when `need_room`; None if too few."""
        ranks = [r for r in range(self.world_size) if r not in exclude and (not need_room or self.fits(r, size))]
        ranks.sort(key=lambda r: (self.counts[layer][r], self.total[r], r))
        return tuple(ranks[:size]) if len(ranks) >= size else None

    def placement(self, epoch: int) -> Placement:
        replicas = {layer: tuple(tuple(groups) for groups in table) for layer, table in self.tables.items()}
        return Placement(epoch=epoch, world_size=self.world_size, replicas=replicas, origin=RECOVERY)


def reformed_placement(current: Placement, rank_map: Mapping[int, int], world_size: int,
                       room: Room = Room(), drop: Forced = ()) -> Reformed:
    """`current` (the old world's placement) for the new world: `rank_map` maps each surviving
    old rank to its new rank (lost ranks are absent); new ranks not in its values are joiners.
    `drop`: groups of `current` (old ranks) to treat as lost, the old world's `forced` ones."""
    assert sorted(rank_map.values()) == sorted(set(rank_map.values())), "two old ranks map to one new rank"
    assert all(0 <= r < world_size for r in rank_map.values()), "a new rank outside the new world"
    # Step 1: keep every replica group whose ranks all survived, renumbered (not those to drop).
    dropped = set(drop)
    kept = {layer: tuple(tuple(tuple(rank_map[r] for r in g) for g in groups
                               if all(r in rank_map for r in g) and (layer, e, g) not in dropped)
                         for e, groups in enumerate(table))
            for layer, table in current.replicas.items()}
    draft = _Draft(world_size, kept, room)
    # Step 2: an expert with no group left gets one, the size of its old group, on the ranks with
    # the fewest experts (joiners first) that have room; where none has room, the world cannot serve.
    unplaced: list[str] = []
    forced: list[tuple[int, int, Group]] = []
    for layer, table in current.replicas.items():
        for expert, groups in enumerate(table):
            if not draft.tables[layer][expert]:
                problem = _place_orphan(draft, layer, expert, size=len(groups[0]))
                if problem:
                    unplaced.append(problem)
                    forced.append((layer, expert, draft.tables[layer][expert][0]))
    return Reformed(draft.placement(current.epoch), _reason(unplaced), tuple(forced))


def _place_orphan(draft: _Draft, layer: int, expert: int, size: int) -> str:
    """Place one replica of an expert that lost them all; return why it does not fit ("" if it does)."""
    if size > 1:
        group = draft.fewest(layer, size, set())
        if group is not None:
            draft.add(layer, expert, group)
            return ""
    group = draft.fewest(layer, 1, set())
    if group is not None:
        draft.add(layer, expert, group)
        return ""
    forced = draft.fewest(layer, 1, set(), need_room=False)
    assert forced is not None, "a world has at least one rank"
    draft.add(layer, expert, forced)
    split = f" (split over {size} ranks before)" if size > 1 else ""
    return (f"layer {layer} expert {expert} has no replica left and no member has room for it"
            f"{split}: {draft.room.expert_bytes} bytes needed")


def _reason(unplaced: list[str]) -> str:
    if len(unplaced) <= MAX_REASONS:
        return "; ".join(unplaced)
    return "; ".join(unplaced[:MAX_REASONS]) + f"; and {len(unplaced) - MAX_REASONS} more experts"


def spread(p: Placement, redundancy: int = 0, room: Room = Room(), level: bool = True) -> Placement:
    """`p` with replicas added (never moved or removed), origin "recovery", no gating factors.

    Step 1: redundancy: in rounds, every expert with fewer than 1 + k groups (round k) gets
    one more group of the size of its first, on the ranks holding the fewest experts.
    Step 2 (when `level`): per layer, the rank with the fewest experts receives a whole copy of
    the expert it lacks with the fewest replicas, until every rank holds as many experts as the
    fullest rank of the layer (or has no room, or holds every expert).
    """
    draft = _Draft(p.world_size, p.replicas, room)
    # Step 1: restore redundancy, one extra replica per expert per round, so that a shortage of
    # room spreads evenly over the experts rather than starving the last ones.
    for round_ in range(1, redundancy + 1):
        for layer, table in draft.tables.items():
            for expert, groups in enumerate(table):
                if len(groups) <= round_:
                    group = draft.fewest(layer, len(groups[0]), draft.holders(layer, expert))
                    if group is not None:
                        draft.add(layer, expert, group)
    # Step 2: level experts per rank with whole copies.
    if level:
        for layer in draft.tables:
            _level(draft, layer)
    return draft.placement(p.epoch)


def _level(draft: _Draft, layer: int) -> None:
    table = draft.tables[layer]
    counts = draft.counts[layer]
    top = max(counts)
    done: set[int] = set()  # ranks that can take no more copies
    while True:
        open_ranks = [r for r in range(draft.world_size) if r not in done and counts[r] < top]
        if not open_ranks:
            return
        rank = min(open_ranks, key=lambda r: (counts[r], draft.total[r], r))
        # Step 2a: the whole expert it lacks with the fewest replicas (then the lowest id).
        lacking = [e for e, groups in enumerate(table)
                   if all(len(g) == 1 for g in groups) and rank not in draft.holders(layer, e)]
        if not lacking or not draft.fits(rank, 1):
            done.add(rank)
            continue
        expert = min(lacking, key=lambda e: (len(table[e]), e))
        draft.add(layer, expert, (rank,))
