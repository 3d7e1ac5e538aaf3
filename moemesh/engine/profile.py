"""Where a step's time goes: torch.profiler over some steps, each seam of the step marked.

`marked_seams(engine, collective)` wraps the seams of one engine's step from outside, for as long
as the context lasts (nothing is added to the unprofiled path): `Engine.schedule`, the attention,
the router, Dispatch (posting it; waiting for it), Experts, Combine (likewise), sampling and, on a
mesh rank, the step header. `split_steps(events, steps)` turns the profiler's events into a
`StepSplit`: per phase the wall time per step and the part of it inside torch ops (the rest is
Python between ops); waits on collectives are their own phase.

The profiler itself costs time for every op it records: callers pass the step time measured
without the profiler (`unprofiled_s`); the difference, spread evenly over the recorded op events,
is taken out where each event's cost lands (inside its parent op for a nested op, between ops for
a top-level one), and the phases are then scaled to add up to the unprofiled step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

from moemesh.model.moe import Done

PREFIX = "moemesh:"
EXECUTE = "execute"  # the container of the model's phases; its own ops are "other model work"
WAITS = ("dispatch wait", "combine wait", "step header")  # blocked in a collective
ORDER = ("schedule", "step header", "attention", "router", "dispatch", "dispatch wait", "experts", "combine",
         "combine wait", "other model work", "sampling", "outside the step")


class _Marked:
    """A callable seam object, each call inside a profiler range; attributes read through."""

    def __init__(self, inner: Any, label: str):
        self.__dict__["_inner"], self.__dict__["_label"] = inner, label

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + self._label):
            return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class _MarkedPending:
    """An exchange in flight whose wait() is its own range."""

    def __init__(self, inner: Any, label: str):
        self.inner, self.label = inner, label

    def wait(self) -> Any:
        with record_function(PREFIX + self.label):
            return self.inner.wait()


def _posting(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def posted(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + label):
            pending = fn(*args, **kwargs)
        return pending if isinstance(pending, Done) else _MarkedPending(pending, label + " wait")
    return posted


@contextmanager
def marked_seams(engine: Any, collective: Any | None = None) -> Iterator[None]:
    """Mark the seams of `engine`'s steps (and `collective`'s step header) while the context lasts."""
    model, moe = engine.model, engine.model.moe
    saved = (model.attention, moe.router, moe.experts)
    transport = moe.transport
    engine.schedule = _Marked(type(engine).schedule.__get__(engine), "schedule")
    engine.execute = _Marked(type(engine).execute.__get__(engine), EXECUTE)
    engine_module = sys.modules[type(engine).__module__]
    sample = getattr(engine_module, "sample")  # noqa: B009 - the engine module's sampler, marked while profiling
    setattr(engine_module, "sample", _Marked(sample, "sampling"))  # noqa: B010
    model.attention, moe.router, moe.experts = (_Marked(saved[0], "attention"), _Marked(saved[1], "router"),
                                                _Marked(saved[2], "experts"))
    transport.dispatch = _posting(type(transport).dispatch.__get__(transport), "dispatch")
    transport.combine = _posting(type(transport).combine.__get__(transport), "combine")
    if collective is not None:
        collective.all_gather = _Marked(type(collective).all_gather.__get__(collective), "step header")
    try:
        yield
    finally:
        setattr(engine_module, "sample", sample)  # noqa: B010
        for obj, names in ((engine, ("schedule", "execute")), (transport, ("dispatch", "combine")),
                           (collective, ("all_gather",))):
            for name in names:
                if obj is not None:
                    obj.__dict__.pop(name, None)
        model.attention, moe.router, moe.experts = saved


@dataclass(frozen=True)
class Phase:
    wall_s: float  # per step
    ops_s: float  # per step, inside torch ops (top-level ops only: nested ones are inside them)


@dataclass(frozen=True)
class StepSplit:
    """Where one step's time went, per phase (seconds per step)."""

    phases: dict[str, Phase]
    profiled_s: float  # step time under the profiler
    unprofiled_s: float  # step time without it (what the caller measured)
    extra: dict[str, float] = field(default_factory=dict)  # phases measured outside (e.g. serving)

    @property
    def overhead_s(self) -> float:
        """The profiler's own cost per step, charged to the Python between ops."""
        return max(0.0, self.profiled_s - self.unprofiled_s)

    def rows(self) -> list[tuple[str, float, float]]:
        """(phase, ms per step, of which in torch ops ms) in ORDER, scaled so that the phases add
        up to the unprofiled step (the overhead model of `split_steps` is approximate), then the
        extra phases."""
        total = sum(p.wall_s for p in self.phases.values())
        k = self.unprofiled_s / total if total > 0 else 1.0
        out = [(name, p.wall_s * k * 1e3, p.ops_s * k * 1e3) for name in ORDER
               if (p := self.phases.get(name)) is not None]
        return out + [(name, s * 1e3, 0.0) for name, s in self.extra.items()]

    def summary(self) -> dict[str, float]:
        """ms per step in torch ops, in Python between ops, blocked in collectives, and measured outside."""
        rows = self.rows()
        ops = sum(o for n, _, o in rows if n not in WAITS)
        waits = sum(w for n, w, _ in rows if n in WAITS)
        outside = sum(w for n, w, _ in rows if n in self.extra)
        return {"torch ops": ops, "Python between ops": sum(w for _, w, _ in rows) - ops - waits - outside,
                "collectives": waits, **{n: w for n, w, _ in rows if n in self.extra}}

    def table(self, title: str) -> str:
        total = sum(w for _, w, _ in self.rows())
        lines = [f"{title}: {total:.2f} ms per step (profiled {self.profiled_s * 1e3:.2f} ms, the profiler's own "
                 f"cost taken out)", f"  {'phase':20} {'ms/step':>8} {'share':>6} {'in torch ops':>13}"]
        for name, wall, ops in self.rows():
            lines.append(f"  {name:20} {wall:8.2f} {wall / total:6.1%} {ops:13.2f}")
        parts = ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in self.summary().items())
        lines.append(f"  split: {parts}")
        return "\n".join(lines)


def profile_steps(run_step: Callable[[], object], steps: int) -> tuple[list[Any], float]:
    """Run `run_step` `steps` times under torch.profiler (CPU) -> (its events, wall seconds)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = time.perf_counter() - start
    return list(prof.events()), wall


def split_steps(events: Sequence[Any], steps: int, wall_s: float, unprofiled_s: float) -> StepSplit:
    """The profiler's events of `steps` steps that took `wall_s` -> per phase seconds per step.
    Only the thread that ran `execute` counts (gloo's and the server's threads are not the step)."""
    execs = [e for e in events if e.name == PREFIX + EXECUTE]
    assert execs, "no marked step in the profile (run it inside marked_seams)"
    thread = execs[0].thread
    own = [e for e in events if e.thread == thread]
    wall: dict[str, float] = {}
    ops: dict[str, float] = {}
    top: dict[str, int] = {}  # top-level op events: their recording cost lands between ops
    nested: dict[str, int] = {}  # op events inside another op: their recording cost lands in it
    for e in own:
        label = _phase_of(e)
        if e.name.startswith(PREFIX):
            children = sum(_us(c) for c in e.cpu_children if c.name.startswith(PREFIX))
            wall[label] = wall.get(label, 0.0) + _us(e) - children
        elif _inside_op(e):
            nested[label] = nested.get(label, 0) + 1
        else:
            ops[label] = ops.get(label, 0.0) + _us(e)
            top[label] = top.get(label, 0) + 1
    marked = sum(_us(e) for e in own if e.name.startswith(PREFIX) and _parent_mark(e) is None)
    wall["outside the step"] = max(0.0, wall_s * 1e6 - marked)
    # The profiler's cost per recorded event, from the profiled and the unprofiled step times.
    events_per_run = sum(top.values()) + sum(nested.values())
    cost = max(0.0, wall_s - unprofiled_s * steps) * 1e6 / max(events_per_run, 1)
    scale = 1e-6 / steps
    phases = {}
    for n, w in wall.items():
        in_ops = max(0.0, ops.get(n, 0.0) - cost * nested.get(n, 0))
        between = max(0.0, w - ops.get(n, 0.0) - cost * top.get(n, 0))
        phases["other model work" if n == EXECUTE else n] = Phase((in_ops + between) * scale, in_ops * scale)
    return StepSplit(phases, wall_s / steps, unprofiled_s)


def _us(e: Any) -> float:
    return float(e.time_range.end - e.time_range.start)


def _parent_mark(e: Any) -> Any | None:
    p = e.cpu_parent
    while p is not None and not p.name.startswith(PREFIX):
        p = p.cpu_parent
    return p


def _phase_of(e: Any) -> str:
    mark = e if e.name.startswith(PREFIX) else _parent_mark(e)
    return mark.name[len(PREFIX):] if mark is not None else "outside the step"


def _inside_op(e: Any) -> bool:
    """True when some ancestor is itself a torch op (its time is counted there)."""
    p = e.cpu_parent
    while p is not None:
        if not p.name.startswith(PREFIX) and not getattr(p, "is_user_annotation", False):
            return True
        p = p.cpu_parent
    return False


def profile_engine(engine: Any, steps: int, unprofiled_s: float, step: Callable[[], object] | None = None,
                   collective: Any | None = None) -> StepSplit:
    """Profile `steps` calls of `step` (default engine.step) with the seams marked."""
    with marked_seams(engine, collective):
        events, wall = profile_steps(step or engine.step, steps)
    return split_steps(events, steps, wall, unprofiled_s)



def decode_split(engine: Any, prompts: Sequence[Sequence[int]], params: Any, steps: int = 16,
                 step: Callable[[], object] | None = None, collective: Any | None = None) -> StepSplit:
    """Admit `prompts`, prefill them, warm up, then time `steps` decode steps without the profiler
    and `steps` with it. `params.max_new_tokens` must cover 2 * steps + 4 tokens."""
    run = step or engine.step
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", list(prompt), params)
    for _ in range(4):  # the prefill, then warm-up
        run()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    unprofiled = (time.perf_counter() - start) / steps
    return profile_engine(engine, steps, unprofiled, run, collective)
