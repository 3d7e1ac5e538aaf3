"""An emulated cluster on this machine: one network namespace per node, shaped links between them.

    with emulated_cluster(nodes=2, workers_per_node=2, rate="200mbit") as cluster:   # a ClusterPlan
        ...  # MeshSpec(..., coordinator_host=cluster.bridge_address, worker_hosts=..., worker_prefix=...)
        interface_bytes(cluster)  # the kernel's counters of every node's link

Layout (all names carry the run id, so two runs or a crashed one never collide; every address is
link-local, 169.254.S.0/24 with S free on this machine, so nothing routes off it):

    root namespace:  bridge mm<id>b  169.254.S.1  (coordinator and gateway bind here)
                       |-- mm<id>h0 ==veth== mm<id>v0  169.254.S.10  namespace mm<id>n0 (node0's workers)
                       |-- mm<id>h1 ==veth== mm<id>v1  169.254.S.11  namespace mm<id>n1 (node1's workers)

Where br_netfilter sends bridged frames through iptables (Docker's FORWARD policy is DROP), one
FORWARD rule lets this bridge forward to itself; it is removed with the cluster.

Each node's one link is shaped with tc's token bucket (`tbf`) at RATE in both directions: egress
of the namespace's end (the node's out-port) and egress of the root end (its in-port): the
planner's per-node InfiniBand port, `ib-out:n` / `ib-in:n`. Workers of one node share the
namespace's address, so their traffic to each other stays on the namespace's loopback, unshaped
(the planner's intra-node link). Traffic to the coordinator and gateway crosses the node's link too.

The run id is `<owner pid, 6 hex><2 random hex>`: `sweep()` (run before every cluster is made)
removes namespaces, links and bridges whose owner process is dead, so a crashed run's leftovers
go at the next start. `emulated_cluster` tears down on exit, also on an exception; `moemesh up`
turns SIGINT / SIGTERM into a normal exit.

The plan (`ClusterPlan`: names, addresses, the `ip`/`tc` commands, the planner topology it
implies) is pure data; only `run_commands`, `sweep`, `emulated_cluster` and `interface_bytes`
touch the system. Root only (`ConfigError` otherwise).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from moemesh.errors import ConfigError, MoemeshError
from moemesh.planner.topology import LOCAL_FLOPS, LOCAL_LINK, LOCAL_MEMORY_BYTES, LinkSpec, Topology

PREFIX = "mm"
NAME = re.compile(rf"^{PREFIX}([0-9a-f]{{6}})([0-9a-f]{{2}})([bhvn])(\d*)$")  # owner pid, tag, kind, node
LINK_LOCAL = "169.254"
FIRST_NODE_HOST = 10  # node n is 169.254.S.(10 + n); the bridge is .1
MAX_NODES = 200
MTU = 9000  # jumbo frames: TCP/IP headers are <1% of a frame, so the kernel's bytes are the payload's
TBF_LATENCY = "1s"  # queue bound of the shaper: long enough that TCP never sees a drop here
LOCK_FILE = Path("/run/lock/moemesh-netns.lock")  # subnet choice and creation are one step per machine
COMMAND_TIMEOUT_S = 20.0

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}  # tc's units: *bit = bits/s, *bps = bytes/s


def parse_rate(text: str) -> int:
    """tc's rate syntax ("200mbit", "1gbit", "50mbps" = bytes/s) -> bits per second."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*", text.lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise ConfigError(f"--inter-node-rate {text!r}: want a number and one of {', '.join(_RATE_UNITS)} "
                          f"(tc's units), e.g. 200mbit")
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if bits < 1e5:
        raise ConfigError(f"--inter-node-rate {text!r}: at least 100kbit")
    return int(bits)


@dataclass(frozen=True)
class NodePlan:
    """One emulated node: its namespace, its veth pair (root end on the bridge, node end inside)."""

    index: int
    name: str  # "node0": the workers' --node
    netns: str
    host_if: str  # root namespace end, a bridge port
    node_if: str  # the namespace's end
    address: str  # the namespace's (and its workers') address


@dataclass(frozen=True)
class ClusterPlan:
    """Everything a cluster is, before anything exists (pure)."""

    run_id: str
    subnet: int  # S of 169.254.S.0/24
    bridge: str
    nodes: tuple[NodePlan, ...]
    workers_per_node: int
    rate_bits: int  # per node and direction

    @property
    def bridge_address(self) -> str:
        """Where coordinator and gateway bind: every node reaches it through its own link."""
        return f"{LINK_LOCAL}.{self.subnet}.1"

    @property
    def workers(self) -> int:
        return len(self.nodes) * self.workers_per_node

    @property
    def burst_bytes(self) -> int:
        """tbf's bucket: 1 ms at RATE, at least two frames: small, so a message waits its bytes / RATE
        as on a real link instead of leaving in one burst."""
        return max(2 * MTU, self.rate_bits // 8 // 1000)

    def node_of_worker(self, i: int) -> NodePlan:
        """Workers are numbered node by node: worker i runs on node i // workers_per_node."""
        return self.nodes[i // self.workers_per_node]

    def worker_prefix(self, i: int) -> tuple[str, ...]:
        """What runs worker i's command inside its node's namespace."""
        return ("ip", "netns", "exec", self.node_of_worker(i).netns)

    def tbf(self, dev: str) -> list[str]:
        return ["qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate_bits}bit",
                "burst", str(self.burst_bytes), "latency", TBF_LATENCY]

    def forward_rule(self) -> list[str]:
        """iptables' FORWARD rule that lets the bridge carry node-to-node frames (with br_netfilter
        loaded, bridged frames traverse FORWARD, whose policy Docker sets to DROP); `-I`/`-D` prepended."""
        return ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    def up_commands(self) -> list[list[str]]:
        """The `ip` / `tc` / `iptables` commands that make the cluster, in order."""
        br = self.bridge
        cmds = [["ip", "link", "add", br, "mtu", str(MTU), "type", "bridge"],
                ["iptables", "-I", *self.forward_rule()],
                ["ip", "link", "set", br, "addrgenmode", "none"],
                ["ip", "addr", "add", f"{self.bridge_address}/24", "dev", br],
                ["ip", "link", "set", br, "up"]]
        for n in self.nodes:
            cmds += [["ip", "netns", "add", n.netns],
                     ["ip", "link", "add", n.host_if, "mtu", str(MTU), "type", "veth", "peer", "name", n.node_if,
                      "mtu", str(MTU)],
                     ["ip", "link", "set", n.host_if, "addrgenmode", "none"],
                     ["ip", "link", "set", n.node_if, "addrgenmode", "none"],
                     ["ip", "link", "set", n.node_if, "netns", n.netns],
                     ["ip", "link", "set", n.host_if, "master", br],
                     ["ip", "link", "set", n.host_if, "up"],
                     ["ip", "-n", n.netns, "link", "set", "lo", "up"],
                     ["ip", "-n", n.netns, "addr", "add", f"{n.address}/24", "dev", n.node_if],
                     ["ip", "-n", n.netns, "link", "set", n.node_if, "up"],
                     ["tc", "-n", n.netns, *self.tbf(n.node_if)],  # the node's out-port
                     ["tc", *self.tbf(n.host_if)]]  # its in-port
        return cmds

    def down_commands(self) -> list[list[str]]:
        """Undo `up_commands` (each may fail: part of it may never have been made). Deleting a
        namespace deletes its veth end, the pair's root end and both qdiscs with it."""
        return ([["ip", "netns", "del", n.netns] for n in self.nodes]
                + [["ip", "link", "del", n.host_if] for n in self.nodes]
                + [["ip", "link", "del", self.bridge], ["iptables", "-D", *self.forward_rule()]])

    def names(self) -> tuple[str, ...]:
        """Every namespace and link this plan creates."""
        return (self.bridge, *(x for n in self.nodes for x in (n.netns, n.host_if, n.node_if)))

    def topology(self, intra: LinkSpec = LOCAL_LINK, device_flops: float = LOCAL_FLOPS,
                 inter_latency_s: float = LOCAL_LINK.latency_s) -> Topology:
        """The planner's view: N nodes of W worker processes; intra-node is loopback gloo (the
        `local` preset's rates unless measured ones are given), inter-node one port per node at RATE."""
        return Topology(name=f"emulated-{len(self.nodes)}x{self.workers_per_node}@{self.rate_bits / 1e6:g}mbit",
                        nodes=len(self.nodes), devices_per_node=self.workers_per_node, devices=self.workers,
                        device_memory_bytes=LOCAL_MEMORY_BYTES // self.workers, device_flops_per_s=device_flops,
                        intra=intra, inter=LinkSpec(self.rate_bits / 8, inter_latency_s))


def plan_cluster(nodes: int, workers_per_node: int, rate: str | int, run_id: str | None = None,
                 subnet: int = 1) -> ClusterPlan:
    """The plan of an `nodes` x `workers_per_node` cluster shaped at `rate` (tc syntax or bits/s).
    `run_id` defaults to a fresh one owned by this process; `subnet` is S of 169.254.S.0/24."""
    if not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"--emulate-nodes must be in 1..{MAX_NODES}, got {nodes}")
    if workers_per_node < 1:
        raise ConfigError(f"--workers-per-node must be >= 1, got {workers_per_node}")
    if not 1 <= subnet <= 254:
        raise ConfigError(f"subnet {subnet}: 169.254.0.0/24 and 169.254.255.0/24 are reserved")
    rid = run_id or new_run_id()
    if not re.fullmatch(r"[0-9a-f]{8}", rid):
        raise ConfigError(f"run id {rid!r}: want 8 hex digits (owner pid, then a tag)")
    bits = parse_rate(rate) if isinstance(rate, str) else int(rate)
    node_plans = tuple(NodePlan(i, f"node{i}", f"{PREFIX}{rid}n{i}", f"{PREFIX}{rid}h{i}", f"{PREFIX}{rid}v{i}",
                                f"{LINK_LOCAL}.{subnet}.{FIRST_NODE_HOST + i}") for i in range(nodes))
    return ClusterPlan(rid, subnet, f"{PREFIX}{rid}b", node_plans, workers_per_node, bits)


def new_run_id(pid: int | None = None) -> str:
    """`<pid, 6 hex><2 random hex>`: the owner is readable from every name (see sweep)."""
    return f"{(os.getpid() if pid is None else pid) & 0xFFFFFF:06x}{secrets.token_hex(1)}"


def topology_yaml(topo: Topology) -> str:
    """`topo` in the YAML `moemesh plan --topology` / `moemesh simulate --topology` read (base units)."""
    def link(s: LinkSpec) -> dict:
        return {"bandwidth_bytes_per_s": float(s.bandwidth_bytes_per_s), "latency_s": float(s.latency_s)}

    doc = {"name": topo.name, "nodes": topo.nodes, "devices_per_node": topo.devices_per_node,
           "devices": topo.devices, "device_memory_bytes": int(topo.device_memory_bytes),
           "device_flops_per_s": float(topo.device_flops_per_s), "intra_node": link(topo.intra),
           "inter_node": link(topo.inter)}
    return yaml.safe_dump(doc, sort_keys=False)


def bytes_between_nodes(before: Mapping[tuple[int, int], float], after: Mapping[tuple[int, int], float],
                        node_of_rank: Mapping[int, int], nodes: int) -> list[list[float]]:
    """[source node][destination node] bytes sent between two readings of the workers' per
    (source rank, destination rank) counters (`moemesh:collective_bytes_total`); pure."""
    out = [[0.0] * nodes for _ in range(nodes)]
    for (src, dst), n in after.items():
        out[node_of_rank[src]][node_of_rank[dst]] += n - before.get((src, dst), 0.0)
    return out


def free_subnet(used_addresses: Sequence[str]) -> int:
    """The lowest S in 1..254 whose 169.254.S.0/24 holds none of `used_addresses` (pure)."""
    taken = {int(a.split(".")[2]) for a in used_addresses if a.startswith(LINK_LOCAL + ".")}
    for s in range(1, 255):
        if s not in taken:
            return s
    raise MoemeshError("every 169.254.S.0/24 on this machine is in use")


def owner_of(name: str) -> int | None:
    """The pid that owns a cluster's namespace or link name; None for any other name (pure)."""
    m = NAME.match(name)
    return int(m.group(1), 16) if m else None


# ---- what touches the system ---------------------------------------------------------------------
def unavailable_reason() -> str | None:
    """Why no cluster can be made here (not root, no `ip`/`tc`, no namespaces); None when it can."""
    if os.geteuid() != 0:
        return "emulated nodes need root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{new_run_id()}n"
    try:
        run_commands([["ip", "netns", "add", probe], ["ip", "netns", "del", probe]])
    except MoemeshError as exc:
        return f"network namespaces are unavailable: {exc}"
    return None


def run_commands(cmds: Sequence[Sequence[str]], check: bool = True) -> list[str]:
    """Run each command (bounded); MoemeshError at the first failure when `check`, else the
    failures' messages. iptables commands are skipped where iptables is not installed (no firewall)."""
    failures = []
    for cmd in cmds:
        if cmd[0] == "iptables" and shutil.which("iptables") is None:
            continue
        try:
            done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
            err = (done.stderr.strip() or f"exit status {done.returncode}") if done.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            err = str(exc)
        if err:
            if check:
                raise MoemeshError(f"`{' '.join(cmd)}` failed: {err}")
            failures.append(f"{' '.join(cmd)}: {err}")
    return failures


def existing_names() -> list[str]:
    """Namespaces and links (root namespace) whose names a cluster would use."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    names = [line.split()[0] for line in netns.stdout.splitlines() if line.strip()]
    names += [line.split(":")[1].strip().split("@")[0] for line in links.stdout.splitlines() if ":" in line]
    return [n for n in names if NAME.match(n)]


def forward_rules() -> list[str]:
    """Bridges named in iptables FORWARD rules a cluster added (`ClusterPlan.forward_rule`)."""
    if shutil.which("iptables") is None:
        return []
    out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    found = (re.fullmatch(r"-A FORWARD -i (\S+) -o (\S+) -j ACCEPT", line.strip()) for line in out.stdout.splitlines())
    return [m.group(1) for m in found if m and m.group(1) == m.group(2) and NAME.match(m.group(1))]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep() -> list[str]:
    """Remove every namespace and link of a cluster whose owner process is dead; their names."""
    gone = [n for n in existing_names() if not _alive(owner_of(n) or 0)]
    cmds = [["ip", "netns", "del", n] for n in gone if NAME.match(n).group(3) == "n"]  # type: ignore[union-attr]
    cmds += [["ip", "link", "del", n] for n in gone if NAME.match(n).group(3) in "hb"]  # type: ignore[union-attr]
    rules = [b for b in forward_rules() if not _alive(owner_of(b) or 0)]
    cmds += [["iptables", "-D", "FORWARD", "-i", b, "-o", b, "-j", "ACCEPT"] for b in rules]
    run_commands(cmds, check=False)  # a veth goes with its peer: some deletes find nothing
    return [*gone, *(f"iptables FORWARD {b}" for b in rules)]


def _used_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         timeout=COMMAND_TIMEOUT_S).stdout
    return [tok.split("/")[0] for line in out.splitlines() for tok in line.split() if tok.startswith(LINK_LOCAL)]


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create(nodes: int, workers_per_node: int, rate: str | int) -> ClusterPlan:
    """Sweep dead runs' leftovers, pick a free subnet and make the cluster (torn down again if a
    command fails); the caller owns `teardown`."""
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(f"cannot emulate nodes: {reason}")
    with _machine_lock():
        sweep()
        plan = plan_cluster(nodes, workers_per_node, rate, subnet=free_subnet(_used_addresses()))
        try:
            run_commands(plan.up_commands())
        except BaseException:
            teardown(plan)
            raise
    return plan


def teardown(plan: ClusterPlan) -> list[str]:
    """Delete the cluster's namespaces and links; the names still present afterwards (none expected)."""
    run_commands(plan.down_commands(), check=False)
    mine = set(plan.names())
    return [n for n in [*existing_names(), *forward_rules()] if n in mine]


@contextlib.contextmanager
def emulated_cluster(nodes: int, workers_per_node: int, rate: str | int) -> Iterator[ClusterPlan]:
    """A cluster for the `with` block; torn down on any exit."""
    plan = create(nodes, workers_per_node, rate)
    try:
        yield plan
    finally:
        teardown(plan)


@dataclass(frozen=True)
class LinkBytes:
    """The kernel's counters of one node's link, read on its root end: `out_bytes` the node sent
    (through its out-port), `in_bytes` it received."""

    out_bytes: int
    in_bytes: int


def interface_bytes(plan: ClusterPlan) -> dict[str, LinkBytes]:
    """Every node's link counters now, by node name (frames at layer 2, as the shaper saw them)."""
    def read(dev: str, what: str) -> int:
        return int(Path(f"/sys/class/net/{dev}/statistics/{what}").read_text())

    return {n.name: LinkBytes(out_bytes=read(n.host_if, "rx_bytes"), in_bytes=read(n.host_if, "tx_bytes"))
            for n in plan.nodes}


def qdisc_rates(plan: ClusterPlan) -> dict[str, int]:
    """The tbf rate (bits/s) in force on every shaped interface, by interface name (a check)."""
    out = {}
    for n in plan.nodes:
        for dev, ns in ((n.node_if, ["-n", n.netns]), (n.host_if, [])):
            text = subprocess.run(["tc", *ns, "qdisc", "show", "dev", dev], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S).stdout
            m = re.search(r"tbf .*rate (\d+(?:\.\d+)?)([KMG]?)bit", text)
            if m:
                out[dev] = int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])
    return out
