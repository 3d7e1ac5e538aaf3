"""`moemesh plan` (moemesh.planner.cli): tables on stdout, the PNG, traces, errors."""

from __future__ import annotations

import argparse
import json

from moemesh.mesh.placement_file import load_placement
from moemesh.planner.cli import PlanSettings, add_plan_command, main
from moemesh.planner.traffic import save_trace, synthetic
from moemesh.settings import settings_from


def test_plan_prints_the_tables_and_writes_the_png(tmp_path, capsys):
    png, placement = tmp_path / "plan.png", tmp_path / "placement.yaml"
    rc = main(["plan", "--topology", "paper-16xh100", "--experts", "16", "--layers", "4", "--skew", "zipf:1.2",
               "--out", str(png), "--write-placement", str(placement), "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for heading in ("== placement", "== links", "== devices", "== summary", "predicted gain over round-robin"):
        assert heading in out
    table = out.split("== placement")[1].split("==")[0].splitlines()
    assert table[1].split() == ["node", "dev", "L0", "L1", "L2", "L3"] and len(table) >= 2 + 16
    assert "ib-in:" in out and "round-robin" in out
    p = load_placement(placement, range(4))
    assert p.world_size == 16 and all(len(ranks) == 1 for ranks in p.layers[0])


def test_plan_reads_a_trace(tmp_path, capsys):
    trace = save_trace(synthetic(8, (1, 3), 4, skew=1.0, seed=0), tmp_path / "trace.json")
    rc = main(["plan", "--topology", "local", "--devices", "4", "--experts", "8", "--layers", "2",
               "--trace", str(trace), "--method", "swap"])
    out = capsys.readouterr().out
    assert rc == 0 and "local-4" in out and "L1" in out and "L3" in out and "swap" in out


def test_plan_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "topo.yaml"
    bad.write_text("nodes: 2\n")
    assert main(["plan", "--topology", str(bad), "--experts", "4", "--layers", "1"]) == 2
    assert "devices_per_node is required" in capsys.readouterr().err
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"format": "moemesh-trace"}))
    assert main(["plan", "--topology", "local", "--experts", "4", "--layers", "1", "--trace", str(trace)]) == 2
    assert "version" in capsys.readouterr().err
    assert main(["plan", "--topology", "local", "--experts", "4"]) == 2
    assert "--experts needs --layers" in capsys.readouterr().err


def test_plan_takes_experts_layers_and_sizes_from_a_model(tmp_path, capsys):
    from moemesh.model.tiny import TinySpec, hf_config

    spec = TinySpec(layers=3, experts=8, top_k=2, hidden=64, intermediate=96, heads=4, kv_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(spec)))
    rc = main(["plan", "--topology", "local", "--devices", "4", "--model", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "8 experts x 3 MoE layers, top-2, 2 slot(s)" in out
    assert f"{64 * 4} B per token" in out  # float32 hidden states


def plan_settings(*argv: str) -> PlanSettings:
    parser = argparse.ArgumentParser()
    add_plan_command(parser.add_subparsers())
    return settings_from(PlanSettings, parser.parse_args(["plan", *argv]), {"MOEMESH_PLAN_SEED": "5"})


def test_plan_settings_are_flags_only_with_their_defaults():
    s = plan_settings("--topology", "local", "--experts", "8", "--layers", "2")
    assert (s.topology, s.experts, s.layers, s.model, s.top_k, s.skew, s.seed, s.method) == (
        "local", 8, 2, None, None, "zipf:1.2", 0, "ours")
    assert (s.tokens_per_device, s.dedupe, s.hidden, s.intermediate, s.dtype_bytes, s.matrices) == (
        256.0, True, 8192, 32768, 2, 2)
    assert plan_settings("--topology", "local", "--model", "m", "--no-dedupe").dedupe is False


def test_plan_wants_exactly_one_of_model_and_experts(tmp_path, capsys):
    assert main(["plan", "--topology", "local"]) == 2
    assert "give one of --model DIR or --experts N" in capsys.readouterr().err
    assert main(["plan", "--topology", "local", "--model", str(tmp_path), "--experts", "4"]) == 2
    assert "give one of --model DIR or --experts N" in capsys.readouterr().err
    assert main(["plan", "--topology", "local", "--model", str(tmp_path), "--layers", "4"]) == 2
    assert "--layers comes from --model" in capsys.readouterr().err


def test_a_grouped_model_is_planned_on_group_limited_traffic(tmp_path):
    """A DeepSeek-V3-layout config, 8 experts in 4 groups of 2, one group per token: the synthetic
    routing never pairs experts of two groups."""
    from moemesh.model.tiny import TinySpec, hf_config
    from moemesh.planner.cli import build_problem

    spec = TinySpec(arch="deepseek_v3", layers=2, experts=8, top_k=2, groups=4, topk_group=1)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(spec)))
    parser = argparse.ArgumentParser()
    add_plan_command(parser.add_subparsers())
    s = settings_from(PlanSettings, parser.parse_args(["plan", "--model", str(tmp_path), "--topology", "local",
                                                       "--devices", "4", "--method", "aligned"]), {})
    problem = build_problem(s)
    group = [e // 2 for e in range(8)]
    across = [(e, f) for e in range(8) for f in range(8) if group[e] != group[f]]
    assert problem.traffic.layer_ids == (1,) and problem.traffic.coactivation.sum() > 0
    assert all(problem.traffic.coactivation[0, e, f] == 0 for e, f in across)
