"""moemesh.top_screen: readings (parsed from real exposition text) -> screen -> lines."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from moemesh.top_screen import HEAT_RAMP, Member, Reading, Screen, WorkerRow, render, screen_of

MEMBERS = (Member(0, "worker-0", "10.0.0.1:5000", "10.0.0.1:9000"), Member(1, "worker-1", "10.0.0.2:5000", ""))


def exposition(steps: int, tokens: int, step_s: float, coll_s: float, routed: dict[tuple[int, int], int],
               links: dict[tuple[int, int], int], running: int = 0) -> list:
    lines = [f'moemesh:steps_total{{model_name="m"}} {steps}', f'moemesh:step_tokens_total{{model_name="m"}} {tokens}',
             f'moemesh:step_seconds_total{{model_name="m"}} {step_s}',
             f'moemesh:collective_seconds_total{{model_name="m"}} {coll_s}',
             f'moemesh:num_requests_running{{model_name="m"}} {running}',
             'moemesh:num_requests_waiting{model_name="m"} 0',
             'moemesh:kv_slots_used{model_name="m"} 2', 'moemesh:kv_slots_total{model_name="m"} 8',
             'moemesh:placement_epoch{model_name="m"} 3']
    lines += [f'moemesh:expert_tokens_routed_total{{model_name="m",layer="{layer}",expert="{e}"}} {n}'
              for (layer, e), n in routed.items()]
    lines += [f'moemesh:link_bytes_total{{model_name="m",src_rank="{s}",dst_rank="{d}"}} {n}'
              for (s, d), n in links.items()]
    text = "\n".join(lines) + "\n"
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def reading(at: float, scale: int, generation: int = 4) -> Reading:
    routed = {(0, 0): 10 * scale, (0, 1): 40 * scale, (1, 0): 25 * scale, (1, 1): 25 * scale}
    return Reading(at, generation, MEMBERS, {
        0: exposition(100 * scale, 400 * scale, 2.0 * scale, 1.5 * scale, routed, {(0, 1): 1000 * scale}, running=3),
        1: "metrics off (--metrics-port -1)"})


def test_rates_come_from_counter_deltas_and_heat_is_normalised_per_layer():
    screen = screen_of(reading(10.0, 1), reading(12.0, 3), "c:1")
    row = screen.rows[0]
    assert (row.steps_per_s, row.tokens_per_s) == (100.0, 400.0)  # (300 - 100) / 2 s, (1200 - 400) / 2 s
    assert row.collective_share == 0.75 and row.hidden_share is None
    assert (row.running, row.kv_used, row.kv_total, row.epoch) == (3, 2, 8, 3)
    assert screen.rows[1].error.startswith("metrics off")
    assert screen.heat == {0: [0.25, 1.0], 1: [1.0, 1.0]}
    assert screen.links == {(0, 1): 1000.0} and screen.window_s == 2.0  # 2000 bytes in 2 s
    assert (screen.generation, screen.epoch) == (4, 3)


def test_first_reading_and_a_new_world_show_totals():
    assert screen_of(None, reading(1.0, 2), "c:1").window_s is None
    fresh = screen_of(reading(1.0, 1, generation=3), reading(2.0, 2), "c:1")
    assert fresh.window_s is None and fresh.rows[0].steps_per_s is None
    assert fresh.links == {(0, 1): 2000.0}


def test_render_shows_every_worker_the_world_heat_and_links():
    screen = screen_of(reading(10.0, 1), reading(12.0, 3), "127.0.0.1:50050")
    lines = render(screen, width=160)
    text = "\n".join(lines)
    assert "coordinator 127.0.0.1:50050 - world generation 4, placement epoch 3, 2 workers" in lines[0]
    assert "10.0.0.1:5000" in text and "10.0.0.2:5000" in text and "metrics off" in text
    assert f"layer   0 e0   |{HEAT_RAMP[2]}{HEAT_RAMP[-1]}|" in text  # 0.25 -> ':' , 1.0 -> '@'
    assert "from   0" in text and "1.0 kB" in text and "last 2.0 s" in text
    assert all(len(line) <= 40 for line in render(screen, width=40))


def test_render_without_a_world():
    lines = render(Screen("h:1", 0, 0, (), note="cannot reach the coordinator at h:1 (UNAVAILABLE)"))
    assert lines[1] == "! cannot reach the coordinator at h:1 (UNAVAILABLE)"
    assert "  (nothing routed yet)" in lines and "  (no traffic yet)" in lines
    assert WorkerRow(MEMBERS[0]).error == ""
