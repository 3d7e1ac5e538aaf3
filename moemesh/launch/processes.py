"""Named child processes of a launcher: start them, wait for their port files, watch, stop them.

Every child is `python -m moemesh.cli <service> ... --exit-with-parent` in its own session, so a
terminal's Ctrl-C reaches only the launcher (which stops them in order) and a dead launcher's
children stop by themselves. A child's output goes to `log_dir/NAME.log` when the group has a
log folder (quoted by `log_tail` in every error), else to the launcher's stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import MoemeshError, UnavailableError
from moemesh.retry import Backoff, retry_sync

STOP_ORDER = ("gateway", "worker", "coordinator")  # roles, in the order `stop` ends them
STDERR_FD = 2  # the launcher's stderr as a descriptor (works while sys.stderr is replaced)
KILL_WAIT_S = 10.0  # a SIGKILLed process is reaped within this (a hang guard)


@dataclass(frozen=True)
class Child:
    name: str  # unique in the group: "coordinator", "worker0", "gateway"
    role: str  # the moemesh.cli service it runs: coordinator | worker | gateway
    proc: subprocess.Popen
    argv: tuple[str, ...]  # what it was started with (a restart runs the same)
    restarts: int = 0  # how many times it was started again after exiting
    prefix: tuple[str, ...] = ()  # what runs the command, e.g. `ip netns exec NS` (moemesh.launch.netns)


class Processes:
    """The children of one launcher, by name; `stop()` is idempotent and always reaps every one."""

    def __init__(self, log_dir: Path | None = None, env: Mapping[str, str] | None = None):
        self.log_dir = log_dir
        self.env = {**os.environ, **(env or {})}
        self.children: dict[str, Child] = {}

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {name: child.proc for name, child in self.children.items()}

    def start(self, name: str, argv: Sequence[str], prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start `moemesh <argv...> --exit-with-parent` as `name`; argv[0] is the service (its role).
        `prefix` runs the command (`ip netns exec NS`: it execs, so the child keeps its pid); restarts keep it."""
        if name in self.children:
            raise MoemeshError(f"a process named {name!r} is already running")
        proc = self._spawn(name, argv, prefix=tuple(prefix))
        self.children[name] = Child(name, argv[0], proc, tuple(argv), prefix=tuple(prefix))
        return proc

    def restart(self, name: str, argv: Sequence[str] | None = None) -> subprocess.Popen:
        """Start `name` again (it exited or was killed) with its argv, or with `argv` (the same
        service) from now on."""
        old = self.children[name]
        if old.proc.poll() is None:
            raise MoemeshError(f"{name} is still running; it cannot be restarted")
        argv = old.argv if argv is None else tuple(argv)
        if argv[0] != old.role:
            raise MoemeshError(f"{name} runs {old.role!r}; it cannot be restarted as {argv[0]!r}")
        proc = self._spawn(name, argv, append=True, prefix=old.prefix)
        self.children[name] = Child(name, old.role, proc, argv, old.restarts + 1, old.prefix)
        return proc

    def exited(self, role: str | None = None) -> list[Child]:
        """The children (of `role`, or any) that are no longer running."""
        return [c for c in self.children.values() if c.proc.poll() is not None and role in (None, c.role)]

    def _spawn(self, name: str, argv: Sequence[str], append: bool = False,
               prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        cmd = [*prefix, sys.executable, "-m", "moemesh.cli", *argv, "--exit-with-parent"]
        if self.log_dir is None:  # stdout stays free for the launcher's own output
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=STDERR_FD, env=self.env,
                                    start_new_session=True)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"{name}.log", "ab" if append else "wb") as out:  # the child keeps its handle
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
        return proc

    def wait_port(self, name: str, port_file: Path, timeout_s: float) -> int:
        """The port `name` published in `port_file`; MoemeshError (with logs) if it died or timed out."""

        def read() -> int:
            self.check_alive()
            text = port_file.read_text().strip() if port_file.is_file() else ""
            if not text:
                raise UnavailableError(f"{name} wrote no port to {port_file} within {timeout_s:.0f} s")
            return int(text)

        try:
            return retry_sync(read, lambda exc: isinstance(exc, UnavailableError),
                              backoff=Backoff(first_s=0.02, cap_s=0.2, deadline_s=timeout_s))
        except UnavailableError as exc:
            raise MoemeshError(f"{exc}\n{self.log_tail()}") from None

    def check_alive(self) -> None:
        """MoemeshError naming the first child that exited (with the logs' tails)."""
        for name, child in self.children.items():
            if child.proc.poll() is not None:
                raise MoemeshError(f"{name} exited with code {child.proc.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` of every child's log (empty when the children log to stderr)."""
        if self.log_dir is None:
            return ""
        parts = []
        for name in self.children:
            path = self.log_dir / f"{name}.log"
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash, not a graceful stop) and reap it."""
        proc = self.children[name].proc
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=KILL_WAIT_S)

    def terminate(self, name: str, timeout_s: float = 15.0) -> int:
        """SIGTERM one process and wait for it (SIGKILL after `timeout_s`); its exit status. It is
        then forgotten: an exit asked for is no crash for `check_alive`, `exited` or a restart."""
        self._signal_all([name])
        self._reap([name], timeout_s)
        return self.children.pop(name).proc.returncode

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the gateways, then the workers, then the coordinator, each group given `timeout_s`
        to exit before SIGKILL."""
        for stage in range(len(STOP_ORDER) + 1):
            names = [name for name, child in self.children.items() if _stage(child.role) == stage]
            self._signal_all(names)
            self._reap(names, timeout_s)

    def _signal_all(self, names: Sequence[str]) -> None:
        for name in names:
            proc = self.children[name].proc
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _reap(self, names: Sequence[str], timeout_s: float) -> None:
        """Wait for `names` together for up to `timeout_s`; SIGKILL whichever is still running."""
        deadline = time.monotonic() + timeout_s
        for name in names:
            proc = self.children[name].proc
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"moemesh: {name} did not stop within {timeout_s:.0f} s; killing it", file=sys.stderr)
                proc.kill()
                proc.wait(timeout=KILL_WAIT_S)


def _stage(role: str) -> int:
    """When `stop` ends a process of `role`: STOP_ORDER's index; unknown roles last."""
    return STOP_ORDER.index(role) if role in STOP_ORDER else len(STOP_ORDER)
