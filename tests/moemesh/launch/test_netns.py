"""The emulated cluster (moemesh.launch.netns): its plan (pure), and as root a real 2-node mesh on
shaped links: tokens identical to the single-process engine, the workers' inter-node byte counts
against the kernel's interface counters, nothing left behind, a crashed owner's leftovers swept.

The tests that make namespaces are marked `nodes`: `make test` leaves them out, `make nodes-test`
runs them (root; they skip with the reason when namespaces are unavailable)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from moemesh.errors import ConfigError
from moemesh.launch import netns
from moemesh.planner.topology import load_topology

ADDRESS = re.compile(r"^169\.254\.(\d+)\.(\d+)$")


# ---- the plan (pure) -----------------------------------------------------------------------------
def test_plan_names_are_unique_short_owned_and_link_local():
    plan = netns.plan_cluster(4, 2, "200mbit", run_id="00abcd7f", subnet=9)
    names = plan.names()
    assert len(set(names)) == len(names) == 1 + 3 * 4
    assert all(len(n) <= 15 for n in names)  # IFNAMSIZ - 1
    assert {netns.owner_of(n) for n in names} == {0xABCD}
    assert netns.owner_of("eth0") is None and netns.owner_of("mm00abcd7fx0") is None
    assert plan.bridge_address == "169.254.9.1"
    assert [n.address for n in plan.nodes] == ["169.254.9.10", "169.254.9.11", "169.254.9.12", "169.254.9.13"]
    assert all(ADDRESS.match(n.address) for n in plan.nodes)
    assert [plan.node_of_worker(i).name for i in range(8)] == ["node0"] * 2 + ["node1"] * 2 + ["node2"] * 2 + [
        "node3"] * 2
    assert plan.worker_prefix(3) == ("ip", "netns", "exec", plan.nodes[1].netns)
    other = netns.plan_cluster(4, 2, "200mbit")
    assert not set(other.names()) & set(names)


def test_every_node_link_is_shaped_both_ways_and_teardown_names_everything():
    plan = netns.plan_cluster(2, 2, "50mbit", run_id="0000017f")
    shaped = [c for c in plan.up_commands() if c[0] == "tc"]
    assert len(shaped) == 4
    for n in plan.nodes:
        out = next(c for c in shaped if n.node_if in c)
        assert out[:3] == ["tc", "-n", n.netns]  # the node's out-port, inside its namespace
        assert next(c for c in shaped if n.host_if in c)[1] == "qdisc"  # its in-port, on the root end
    assert all("tbf" in c and "50000000bit" in c for c in shaped)
    down = {c[-1] for c in plan.down_commands() if c[0] == "ip"}
    assert down == {plan.bridge, *(n.netns for n in plan.nodes), *(n.host_if for n in plan.nodes)}
    assert ["iptables", "-D", *plan.forward_rule()] in plan.down_commands()
    assert ["iptables", "-I", *plan.forward_rule()] in plan.up_commands()


def test_topology_file_round_trips_through_the_planner_reader(tmp_path):
    plan = netns.plan_cluster(2, 2, "200mbit", run_id="0000017f")
    path = tmp_path / "topo.yaml"
    path.write_text(netns.topology_yaml(plan.topology()))
    topo = load_topology(path)
    assert topo == plan.topology()
    assert (topo.nodes, topo.devices_per_node, topo.devices) == (2, 2, 4)
    assert topo.inter.bandwidth_bytes_per_s == 25e6  # 200 Mbit/s per node port, each way


def test_bytes_between_nodes_sums_rank_pairs_by_node():
    before = {(0, 2): 100.0, (2, 0): 50.0}
    after = {(0, 1): 10.0, (0, 2): 400.0, (2, 0): 80.0, (3, 1): 7.0}
    assert netns.bytes_between_nodes(before, after, {0: 0, 1: 0, 2: 1, 3: 1}, 2) == [[10.0, 300.0], [37.0, 0.0]]


def test_rates_subnets_and_bad_input():
    assert netns.parse_rate("200mbit") == 200_000_000
    assert netns.parse_rate("1gbit") == 1_000_000_000
    assert netns.parse_rate("5mbps") == 40_000_000  # tc: bps = bytes per second
    for bad in ("fast", "200", "200mbits", "10bit"):
        with pytest.raises(ConfigError):
            netns.parse_rate(bad)
    assert netns.free_subnet(["10.0.0.1", "169.254.1.1", "169.254.2.10"]) == 3
    for bad_plan in ((0, 1), (2, 0)):
        with pytest.raises(ConfigError):
            netns.plan_cluster(*bad_plan, "1gbit")


# ---- real namespaces (root) ------------------------------------------------------------------------
def _require_netns() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _leftovers(run_id: str) -> list[str]:
    """Namespaces, links, qdiscs and firewall rules of run `run_id` still present."""
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, timeout=20).stdout
    return [n for n in [*netns.existing_names(), *netns.forward_rules()] if run_id in n] + [
        line for line in qdiscs.splitlines() if run_id in line]


def _scrape(urls: dict[str, str]) -> dict[str, dict[tuple[int, int], float]]:
    """moemesh:collective_bytes_total{src_rank, dst_rank} of every worker, by worker name."""
    row = re.compile(r"^moemesh:collective_bytes_total\{([^}]*)\} (\S+)$")
    out = {}
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        rows = {}
        for m in filter(None, map(row.match, text.splitlines())):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
            rows[(int(labels["src_rank"]), int(labels["dst_rank"]))] = float(m[2])
        out[name] = rows
    return out


async def _generate(gateway: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from moemesh.client import Client
    from moemesh.engine.sampling import SamplingParams

    async with Client(gateway, timeout=120) as client:
        async def one(p: list[int]) -> list[int]:
            out: list[int] = []
            async for ev in client.generate(token_ids=p, params=SamplingParams(max_new_tokens=new_tokens,
                                                                                ignore_eos=True), include_text=False):
                out += list(getattr(ev, "token_ids", []))
            return out

        return list(await asyncio.gather(*(one(p) for p in prompts)))


# 32 requests, hidden 512: each (source, destination) block of a decode step's all-to-all is ~16
# rows x 2 KB, so the framing the workers do not count (TCP/IP headers and ACKs, gloo's own
# messages, the gRPC control traffic on the same links) stays a few percent of what they count.
PROMPTS = [[0, *range(3 + 7 * i, 3 + 7 * i + 5 + i % 4)] for i in range(32)]
NEW_TOKENS = 24


@pytest.mark.nodes
@pytest.mark.timeout(600)  # hang bound: a 2-node mesh starts, serves 33 requests and stops
def test_two_node_mesh_is_token_identical_counts_its_bytes_and_leaves_nothing(tmp_path):
    _require_netns()
    from moemesh.engine.engine import Engine, generate
    from moemesh.engine.sampling import SamplingParams
    from moemesh.launcher import UpProcess
    from moemesh.model.decoder import RuntimeShape, build_model
    from moemesh.model.tiny import TinySpec, write_tiny_model

    model = write_tiny_model(tmp_path / "model", TinySpec(layers=2, experts=8, hidden=512, intermediate=256,
                                                          heads=4, kv_heads=2, vocab=512, seed=3))
    engine = Engine(build_model(model, RuntimeShape(max_seqs=1, max_model_len=256)))
    expected = [generate(engine, [p], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0] for p in PROMPTS]
    topology = tmp_path / "topology.yaml"
    up = UpProcess(model, 4, ("--emulate-nodes", "2", "--workers-per-node", "2", "--inter-node-rate", "100mbit",
                              "--policy", "none", "--topology-file", str(topology)), quiet=True)
    try:
        assert up.proc.stdout is not None
        urls = {name: url for name, url in re.findall(r"(worker\d+) (http://\S+/metrics)", up.proc.stdout.readline())}
        run_id = up.cluster_run_id
        assert run_id and len(urls) == 4
        plan = netns.plan_cluster(2, 2, "100mbit", run_id=run_id)
        assert set(netns.qdisc_rates(plan).values()) == {100_000_000}  # both ends of both node links
        assert load_topology(topology) == plan.topology()  # what `moemesh plan` / `simulate` will read
        asyncio.run(_generate(up.gateway, PROMPTS[:1], 2))  # every worker has stepped: each knows its rank
        before, kernel_before = _scrape(urls), netns.interface_bytes(plan)
        got = asyncio.run(_generate(up.gateway, PROMPTS, NEW_TOKENS))
        kernel_after, after = netns.interface_bytes(plan), _scrape(urls)
    finally:
        survivors = up.stop()
    assert got == expected  # token-identical to the single-process engine
    assert survivors == []
    assert _leftovers(run_id) == []  # no namespace, link or qdisc left

    node_of_rank = {src: int(name.removeprefix("worker")) // 2 for name, rows in after.items() for src, _ in rows}
    assert sorted(node_of_rank) == [0, 1, 2, 3]
    merged_before = {k: v for rows in before.values() for k, v in rows.items()}
    merged_after = {k: v for rows in after.values() for k, v in rows.items()}
    matrix = netns.bytes_between_nodes(merged_before, merged_after, node_of_rank, 2)  # (source node, dest. node)
    counted = matrix[0][1] + matrix[1][0]
    kernel = sum(kernel_after[n].out_bytes - kernel_before[n].out_bytes for n in kernel_after)
    print(f"\nbytes per (source node, destination node): {matrix}; workers counted {counted:.0f} inter-node "
          f"bytes, the node links carried {kernel} ({kernel / counted - 1:+.2%})")
    assert counted > 0 and abs(kernel - counted) <= 0.05 * counted


_OWNER = """
import sys, time
from moemesh.launch import netns
plan = netns.create(2, 1, "10mbit")
print(plan.run_id, flush=True)
time.sleep(600)
"""


@pytest.mark.nodes
@pytest.mark.timeout(120)  # hang bound
def test_a_dead_owners_cluster_is_swept_and_a_live_ones_is_not():
    _require_netns()
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().strip()
        assert len(_leftovers(run_id)) >= 5  # bridge, 2 namespaces, 2 root ends (+ their qdiscs, the rule)
        assert not any(run_id in n for n in netns.sweep())  # its owner lives: untouched
        assert _leftovers(run_id)
    finally:
        owner.send_signal(signal.SIGKILL)  # a crash: nothing of the cluster is torn down
        owner.wait(timeout=30)
    assert _leftovers(run_id)
    assert any(run_id in n for n in netns.sweep())
    assert _leftovers(run_id) == []


@pytest.mark.nodes
def test_up_refuses_emulation_without_root_with_a_clear_error(tmp_path):
    if netns.unavailable_reason() is None and not Path("/usr/bin/setpriv").exists():
        pytest.skip("running as root and no setpriv to drop it")
    cmd = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(tmp_path), "--emulate-nodes", "2"]
    if netns.unavailable_reason() is None:  # root: run it as nobody
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot emulate nodes" in done.stderr and "root" in done.stderr
