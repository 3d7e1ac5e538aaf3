"""What `moemesh top` shows, as data and as lines of text. Pure: no curses, no network.

`screen_of(previous, now)` turns two readings of a mesh (the world's members and every worker's
parsed metrics samples, taken one refresh apart) into a `Screen`: per worker its load, KV use,
steps/s and tokens/s (counter deltas over the interval), the share of its steps spent in
collectives and of its exchanges hidden behind compute; the expert heat (token copies routed per
MoE layer x expert, each layer normalised to its hottest expert); the link traffic (bytes/s per
source -> destination rank). With no previous reading, or no traffic in the interval, heat and
links show totals since the workers started. `render(screen, width)` draws it into lines;
moemesh.top only puts them on the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.samples import Sample

from moemesh.metrics import by_label, value

HEAT_RAMP = " .:-=+*#%@"  # share of the layer's hottest expert, 0 .. 1
HEAT_WIDTH = 64  # experts per heat line (more wrap onto the next line)
ROUTED = "moemesh:expert_tokens_routed_total"
LINKS = "moemesh:link_bytes_total"


@dataclass(frozen=True)
class Member:
    rank: int
    worker_id: str
    address: str
    metrics_address: str


@dataclass(frozen=True)
class Reading:
    """One read of the mesh at `at` (seconds, monotonic): the world and each rank's samples, or
    why they could not be read."""

    at: float
    generation: int
    members: tuple[Member, ...]
    samples: dict[int, list[Sample] | str]


@dataclass(frozen=True)
class WorkerRow:
    member: Member
    error: str = ""
    running: int = 0
    waiting: int = 0
    kv_used: int = 0
    kv_total: int = 0
    epoch: int = 0
    steps_per_s: float | None = None  # None: no previous reading yet
    tokens_per_s: float | None = None
    collective_share: float | None = None  # of step time, over the interval
    hidden_share: float | None = None  # of exchange time, over the interval


@dataclass(frozen=True)
class Screen:
    coordinator: str
    generation: int
    epoch: int
    rows: tuple[WorkerRow, ...]
    heat: dict[int, list[float]] = field(default_factory=dict)  # layer -> per expert, 0..1
    links: dict[tuple[int, int], float] = field(default_factory=dict)  # (src, dst) -> bytes (per s when a window)
    window_s: float | None = None  # heat and links cover this interval; None = since the workers started
    note: str = ""  # a problem to show (the coordinator unreachable, ...)


def screen_of(previous: Reading | None, now: Reading, coordinator: str, note: str = "") -> Screen:
    """The screen for reading `now`, rates over the interval since `previous` (same world only)."""
    before = previous if previous is not None and previous.generation == now.generation else None
    dt = now.at - before.at if before is not None else 0.0
    rows = tuple(_row(m, now.samples.get(m.rank, "not read"), _old(before, m.rank), dt) for m in now.members)
    fresh = {rank: s for rank, s in now.samples.items() if not isinstance(s, str)}
    old = {rank: _old(before, rank) or [] for rank in fresh} if before is not None and dt > 0 else None
    if old is not None and _summed(fresh, ROUTED) == _summed(old, ROUTED):
        old = None  # nothing routed in the interval: show the totals rather than an empty picture
    heat = _heat(_counts(fresh, old, ROUTED, "layer", "expert"))
    links = _links(_counts(fresh, old, LINKS, "src_rank", "dst_rank"), len(now.members))
    window = dt if old is not None else None
    if window is not None:
        links = {k: v / dt for k, v in links.items()}
    epoch = max((r.epoch for r in rows), default=0)
    return Screen(coordinator, now.generation, epoch, rows, heat, links, window, note)


def _old(reading: Reading | None, rank: int) -> list[Sample] | None:
    if reading is None:
        return None
    samples = reading.samples.get(rank)
    return None if isinstance(samples, str) or samples is None else samples


def _row(member: Member, samples: list[Sample] | str, old: list[Sample] | None, dt: float) -> WorkerRow:
    if isinstance(samples, str):
        return WorkerRow(member, error=samples)

    def delta(name: str) -> float:
        return value(samples, name) - value(old or [], name)

    rates: dict[str, float | None] = dict.fromkeys(("steps", "tokens", "collective", "hidden"))
    if old is not None and dt > 0:
        step_s, exchange_s = delta("moemesh:step_seconds_total"), delta("moemesh:exchange_seconds_total")
        rates = {"steps": delta("moemesh:steps_total") / dt, "tokens": delta("moemesh:step_tokens_total") / dt,
                 "collective": delta("moemesh:collective_seconds_total") / step_s if step_s > 0 else None,
                 "hidden": delta("moemesh:exchange_hidden_seconds_total") / exchange_s if exchange_s > 0 else None}
    return WorkerRow(
        member, running=int(value(samples, "moemesh:num_requests_running")),
        waiting=int(value(samples, "moemesh:num_requests_waiting")),
        kv_used=int(value(samples, "moemesh:kv_slots_used")), kv_total=int(value(samples, "moemesh:kv_slots_total")),
        epoch=int(value(samples, "moemesh:placement_epoch")), steps_per_s=rates["steps"],
        tokens_per_s=rates["tokens"], collective_share=rates["collective"], hidden_share=rates["hidden"])


def _summed(samples: dict[int, list[Sample]], name: str, *keys: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for rank_samples in samples.values():
        for key, n in by_label(rank_samples, name, *keys).items():
            out[key] = out.get(key, 0.0) + n
    return out


def _counts(now: dict[int, list[Sample]], old: dict[int, list[Sample]] | None, name: str, *keys: str
            ) -> dict[tuple[str, ...], float]:
    """Counter `name` summed over workers per label values: since `old` was read, or in total."""
    total = _summed(now, name, *keys)
    if old is None:
        return total
    was = _summed(old, name, *keys)
    return {k: v - was.get(k, 0.0) for k, v in total.items()}


def _heat(counts: dict[tuple[str, ...], float]) -> dict[int, list[float]]:
    layers: dict[int, dict[int, float]] = {}
    for (layer_label, expert_label), n in counts.items():
        layers.setdefault(int(layer_label), {})[int(expert_label)] = n
    heat: dict[int, list[float]] = {}
    for layer, per_expert in sorted(layers.items()):
        row = [per_expert.get(e, 0.0) for e in range(max(per_expert) + 1)]
        top = max(row)
        heat[layer] = [n / top if top > 0 else 0.0 for n in row]
    return heat


def _links(counts: dict[tuple[str, ...], float], ranks: int) -> dict[tuple[int, int], float]:
    """Links between the ranks of the current world (totals of earlier worlds, under old ranks, left out)."""
    return {(int(s), int(d)): n for (s, d), n in counts.items() if int(s) < ranks and int(d) < ranks}


# ---- drawing -------------------------------------------------------------------------------------


def render(screen: Screen, width: int = 160) -> list[str]:
    """The screen as lines of at most `width` characters."""
    lines = [f"moemesh top - coordinator {screen.coordinator} - world generation {screen.generation}, placement "
             f"epoch {screen.epoch}, {len(screen.rows)} workers   (q quits)"]
    if screen.note:
        lines.append(f"! {screen.note}")
    lines += ["", "rank  worker        address                metrics                run wait  KV use        "
              "steps/s   tok/s  coll  hidden"]
    lines += [_worker_line(r) for r in screen.rows]
    window = f"last {screen.window_s:.1f} s" if screen.window_s is not None else "since the workers started"
    lines += ["", f"expert heat: tokens routed per MoE layer x expert, share of the layer's hottest "
              f"('{HEAT_RAMP[1]}' low .. '{HEAT_RAMP[-1]}' hottest), {window}"]
    for layer, shares in screen.heat.items():
        for start in range(0, len(shares), HEAT_WIDTH):
            label = f"layer {layer:>3}" if start == 0 else " " * 9
            lines.append(f"{label} e{start:<4}|{''.join(_shade(s) for s in shares[start:start + HEAT_WIDTH])}|")
    if not screen.heat:
        lines.append("  (nothing routed yet)")
    unit = "bytes/s" if screen.window_s is not None else "bytes"
    lines += ["", f"link traffic: token-copy {unit}, row = source rank, column = destination rank, {window}"]
    lines += _link_lines(screen.links, len(screen.rows))
    return [line[:width] for line in lines]


def _worker_line(r: WorkerRow) -> str:
    m = r.member
    head = f"{m.rank:>4}  {m.worker_id[:12]:<12}  {m.address[:21]:<21}  {(m.metrics_address or 'off')[:21]:<21}"
    if r.error:
        return f"{head}  {r.error}"
    kv = f"{r.kv_used}/{r.kv_total} {100 * r.kv_used / r.kv_total:3.0f}%" if r.kv_total else "-"
    return (f"{head}  {r.running:>3} {r.waiting:>4}  {kv:<12} {_num(r.steps_per_s):>8} {_num(r.tokens_per_s):>7}"
            f"  {_share(r.collective_share):>4}  {_share(r.hidden_share):>6}")


def _link_lines(links: dict[tuple[int, int], float], ranks: int) -> list[str]:
    if not links:
        return ["  (no traffic yet)"]
    header = "         " + "".join(f"{'to ' + str(d):>11}" for d in range(ranks))
    rows = [f"from {s:>3} " + "".join(f"{_bytes(links.get((s, d), 0.0)):>11}" for d in range(ranks))
            for s in range(ranks)]
    return [header, *rows]


def _shade(share: float) -> str:
    return HEAT_RAMP[min(len(HEAT_RAMP) - 1, round(share * (len(HEAT_RAMP) - 1)))]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _bytes(n: float, units: Sequence[str] = ("B", "kB", "MB", "GB", "TB")) -> str:
    for unit in units:
        if abs(n) < 1000 or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
