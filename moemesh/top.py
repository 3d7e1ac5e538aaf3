"""`moemesh top --coordinator HOST:PORT`: a live terminal view of a running mesh (curses, works over ssh).

Every refresh (`--refresh`, 1 s) it asks the coordinator for the world (WaitForWorld as an
observer: the members, their ranks and metrics addresses), scrapes every worker's metrics endpoint
(one GET each, `--timeout`), and draws what moemesh.top_screen makes of this reading and the one
before: per worker load, KV use, steps/s and tokens/s, expert heat, link traffic. `q` quits. A
coordinator that cannot be reached at start is a clean error (exit 1); one that goes away later is
shown on the screen while top keeps trying. `--once` prints one screen (two readings one refresh
apart) to stdout instead, for scripts and terminals without curses.
"""

from __future__ import annotations

import argparse
import curses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc

from moemesh.errors import ConfigError, UnavailableError
from moemesh.metrics import scrape
from moemesh.settings import add_options, option, parse_bool, settings_from
from moemesh.tls import ca_option, cert_option, key_option, tls_of
from moemesh.top_screen import Member, Reading, Screen, render, screen_of
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc

DEFAULT_COORDINATOR = "127.0.0.1:50050"


@dataclass(frozen=True)
class TopSettings:
    """A one-shot tool: flags only, but the coordinator's address, which shells and scripts share."""

    ENV_PREFIX: ClassVar[str | None] = None

    coordinator: str = option("--coordinator", "coordinator address", default=DEFAULT_COORDINATOR,
                              env="MOEMESH_COORDINATOR_ADDRESS", metavar="HOST:PORT")
    refresh_s: float = option("--refresh", "seconds between screens", float, default=1.0)
    timeout_s: float = option("--timeout", "deadline of each call to the coordinator and each scrape, s", float,
                              default=2.0)
    once: bool = option("--once", "print one screen to stdout and exit (no curses)", parse_bool, default=False)
    tls_cert: Path | None = cert_option(env="MOEMESH_TLS_CERT")  # mTLS to the coordinator: all three or none
    tls_key: Path | None = key_option(env="MOEMESH_TLS_KEY")
    tls_ca: Path | None = ca_option(env="MOEMESH_TLS_CA")

    def __post_init__(self) -> None:
        if not self.coordinator or ":" not in self.coordinator:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.refresh_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("--refresh and --timeout must be positive")
        tls_of(self)  # all three TLS files or none


class MeshReader:
    """Reads the world from the coordinator and every worker's metrics; one channel for its life."""

    def __init__(self, settings: TopSettings):
        self.s = settings
        tls = tls_of(settings)
        self._channel = (grpc.insecure_channel(settings.coordinator) if tls is None
                         else grpc.secure_channel(settings.coordinator, tls.channel_credentials()))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def read(self) -> Reading:
        """UnavailableError when the coordinator does not answer (or has no world yet)."""
        try:
            world = self._stub.WaitForWorld(coordinator_pb2.WaitForWorldRequest(), timeout=self.s.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            why = ("no world formed yet" if code == grpc.StatusCode.DEADLINE_EXCEEDED
                   else f"cannot reach the coordinator at {self.s.coordinator} ({code.name if code else exc})")
            raise UnavailableError(why) from None
        members = tuple(Member(m.rank, m.worker_id, m.address, m.metrics_address) for m in world.members)
        return Reading(time.monotonic(), world.generation, members, {m.rank: self._scrape(m) for m in members})

    def _scrape(self, member: Member):
        if not member.metrics_address:
            return "metrics off (--metrics-port -1)"
        try:
            return scrape(member.metrics_address, self.s.timeout_s)
        except (OSError, ValueError) as exc:
            return f"metrics not readable: {exc}"


class Top:
    """The previous reading and what to show next; `step()` reads once and returns the screen."""

    def __init__(self, reader: MeshReader, coordinator: str):
        self.reader, self.coordinator = reader, coordinator
        self.previous: Reading | None = None

    def step(self) -> Screen:
        try:
            now = self.reader.read()
        except UnavailableError as exc:
            if self.previous is None:
                return Screen(self.coordinator, 0, 0, (), note=str(exc))
            return screen_of(None, self.previous, self.coordinator, note=f"{exc}; showing the last reading")
        screen = screen_of(self.previous, now, self.coordinator)
        self.previous = now
        return screen


def run_top(s: TopSettings) -> int:
    reader = MeshReader(s)
    try:
        try:
            first = reader.read()
        except UnavailableError as exc:
            print(f"moemesh top: {exc}", file=sys.stderr)
            return 1
        top = Top(reader, s.coordinator)
        top.previous = first
        if s.once:
            time.sleep(s.refresh_s)
            print("\n".join(render(top.step())))
            return 0
        curses.wrapper(_draw_loop, top, s.refresh_s)
        return 0
    finally:
        reader.close()


def _draw_loop(stdscr, top: Top, refresh_s: float) -> None:
    """Curses only draws the lines; `q` quits; a key press or the refresh interval redraws."""
    curses.curs_set(0)
    stdscr.timeout(int(refresh_s * 1000))
    screen = screen_of(None, top.previous, top.coordinator) if top.previous is not None else top.step()
    while True:
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, line in enumerate(render(screen, max(1, width - 1))[:height]):
            stdscr.addstr(y, 0, line)
        stdscr.refresh()
        key = stdscr.getch()
        if key in (ord("q"), ord("Q")):
            return
        screen = top.step()


def add_top_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Register `top`; returns run(args) -> exit status."""
    p = sub.add_parser("top", help="live terminal view of a mesh: workers, expert heat, link traffic (q quits)",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    add_options(p, TopSettings)

    def run(args: argparse.Namespace) -> int:
        return run_top(settings_from(TopSettings, args, os.environ))

    return run
