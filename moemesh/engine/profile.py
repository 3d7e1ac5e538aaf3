"""Where a step's time goes: each seam of the step marked, timed by the clock, and split into
torch ops and Python between them by torch.profiler.

`marked_seams(engine, clock, collective)` wraps the seams of one engine's step from outside, for
as long as the context lasts (nothing is added to the unmarked path): `Engine.schedule`, the
attention, the router, Dispatch (posting it; waiting for it), Experts, Combine (likewise),
sampling and, on a mesh rank, the step header. Each marked call is timed into `clock` (its own
time, nested marks taken out) and is a torch.profiler range.

`decode_split` runs decode steps twice: once timed by the clock alone (a perf_counter pair per
mark: the phases' wall times, nearly unperturbed), once under torch.profiler, which gives each
phase's share spent inside torch ops (`split_steps`; the profiler's own cost per recorded op
inflates both sides alike). Waits on collectives are their own phases.
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


class Clock:
    """Own seconds per mark label (a mark's time less the marks nested in it)."""

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        self._children: list[float] = []  # per open mark: seconds of the marks nested in it

    @contextmanager
    def mark(self, label: str) -> Iterator[None]:
        with record_function(PREFIX + label):
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                yield
            finally:
                took = time.perf_counter() - start
                nested = self._children.pop()
                self.own[label] = self.own.get(label, 0.0) + took - nested
                if self._children:
                    self._children[-1] += took


class _Marked:
    """A callable seam object, each call a mark of `clock`; attributes read through."""

    def __init__(self, inner: Any, label: str, clock: Clock):
        self.__dict__["_inner"], self.__dict__["_label"], self.__dict__["_clock"] = inner, label, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._clock.mark(self._label):
            return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class _MarkedPending:
    """An exchange in flight whose wait() is its own range."""

    def __init__(self, inner: Any, label: str, clock: Clock):
        self.inner, self.label, self.clock = inner, label, clock

    def wait(self) -> Any:
        with self.clock.mark(self.label):
            return self.inner.wait()


def _posting(fn: Callable[..., Any], label: str, clock: Clock) -> Callable[..., Any]:
    def posted(*args: Any, **kwargs: Any) -> Any:
        with clock.mark(label):
            pending = fn(*args, **kwargs)
        return pending if isinstance(pending, Done) else _MarkedPending(pending, label + " wait", clock)
    return posted


@contextmanager
def marked_seams(engine: Any, clock: Clock, collective: Any | None = None) -> Iterator[None]:
    """Mark the seams of `engine`'s steps (and `collective`'s step header) while the context lasts."""
    model, moe = engine.model, engine.model.moe
    saved = (model.attention, moe.router, moe.experts)
    transport = moe.transport
    engine.schedule = _Marked(type(engine).schedule.__get__(engine), "schedule", clock)
    engine.execute = _Marked(type(engine).execute.__get__(engine), EXECUTE, clock)
    engine_module = sys.modules[type(engine).__module__]
    sample = getattr(engine_module, "sample")  # noqa: B009 - the engine module's sampler, marked while profiling
    setattr(engine_module, "sample", _Marked(sample, "sampling", clock))  # noqa: B010
    model.attention, moe.router, moe.experts = (_Marked(saved[0], "attention", clock),
                                                _Marked(saved[1], "router", clock), _Marked(saved[2], "experts", clock))
    transport.dispatch = _posting(type(transport).dispatch.__get__(transport), "dispatch", clock)
    transport.combine = _posting(type(transport).combine.__get__(transport), "combine", clock)
    if collective is not None:
        collective.all_gather = _Marked(type(collective).all_gather.__get__(collective), "step header", clock)
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
    wall_s: float  # per step, by the clock
    ops_s: float  # per step, inside torch ops (the profiled run's share of the phase, times wall_s)


@dataclass(frozen=True)
class StepSplit:
    """Where one step's time went, per phase (seconds per step)."""

    phases: dict[str, Phase]
    step_s: float  # the marked run's step time
    profiled_s: float  # the profiled run's step time (the profiler costs time for every op)
    extra: dict[str, float] = field(default_factory=dict)  # phases measured outside (e.g. serving)

    def rows(self) -> list[tuple[str, float, float]]:
        """(phase, ms per step, of which in torch ops ms) in ORDER, then the extra phases."""
        out = [(name, p.wall_s * 1e3, p.ops_s * 1e3) for name in ORDER if (p := self.phases.get(name)) is not None]
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
        lines = [f"{title}: {total:.2f} ms per step (under torch.profiler {self.profiled_s * 1e3:.2f} ms)",
                 f"  {'phase':20} {'ms/step':>8} {'share':>6} {'in torch ops':>13}"]
        for name, wall, ops in self.rows():
            lines.append(f"  {name:20} {wall:8.2f} {wall / total:6.1%} {ops:13.2f}")
        parts = ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in self.summary().items())
        lines.append(f"  split: {parts}")
        return "\n".join(lines)


def op_shares(events: Sequence[Any]) -> dict[str, float]:
    """The profiler's events -> per phase the share of its own time spent inside torch ops
    (top-level ops only: nested ones are inside them). Only the thread that ran `execute` counts
    (gloo's and the server's threads are not the step)."""
    execs = [e for e in events if e.name == PREFIX + EXECUTE]
    assert execs, "no marked step in the profile (run it inside marked_seams)"
    thread = execs[0].thread
    own: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in (e for e in events if e.thread == thread):
        label = _phase_of(e)
        if e.name.startswith(PREFIX):
            own[label] = own.get(label, 0.0) + _us(e) - sum(_us(c) for c in e.cpu_children if c.name.startswith(PREFIX))
        elif not _inside_op(e):
            ops[label] = ops.get(label, 0.0) + _us(e)
    return {n: min(1.0, ops.get(n, 0.0) / w) if w > 0 else 0.0 for n, w in own.items()}


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


def decode_split(engine: Any, prompts: Sequence[Sequence[int]], params: Any, steps: int = 16,
                 step: Callable[[], object] | None = None, collective: Any | None = None) -> StepSplit:
    """Admit `prompts`, prefill them, warm up, then run `steps` decode steps timed by the marks and
    `steps` more under torch.profiler. `params.max_new_tokens` must cover 2 * steps + 4 tokens."""
    run = step or engine.step
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", list(prompt), params)
    for _ in range(4):  # the prefill, then warm-up
        run()
    clock = Clock()
    with marked_seams(engine, clock, collective):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        wall = time.perf_counter() - start
        own = dict(clock.own)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                run()
            profiled = time.perf_counter() - start
    shares = op_shares(list(prof.events()))
    own["outside the step"] = max(0.0, wall - sum(own.values()))
    phases = {("other model work" if n == EXECUTE else n): Phase(w / steps, w / steps * shares.get(n, 0.0))
              for n, w in own.items()}
    return StepSplit(phases, wall / steps, profiled / steps)
