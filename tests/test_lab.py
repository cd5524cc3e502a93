"""The lab Session and its dashboard (widget logic, not the browser)."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab.lab import Session, widgets

PROMPTS = [
    "The :mod:`os` module provides a portable way of using operating system dependent functionality.",
    "A list comprehension consists of brackets containing an expression followed by a for clause.",
]


@pytest.fixture(scope="module")
def session():
    s = Session("tiny", accelerator="simulated:rtx4090-24g", budget=0.15)
    s.record(PROMPTS, max_tokens=64)
    return s


def test_session_records_places_and_simulates(session):
    assert session.trace.ids.shape[1:] == (6, 4)
    assert session.placement.strategy == "frequency" and session.placement.num_gpu_experts == session.slots()
    r = session.simulate("value", budget=0.3)
    assert r.simulated == "rtx4090-24g" and 0 <= r.hit_rate <= 1
    rows = session.sweep(policies=("lru", "belady"), budgets=(0.1, 0.3), plot=False)
    by = {(row["policy"], row["budget"]): row["hit_rate"] for row in rows}
    assert by[("belady", 0.1)] >= by[("lru", 0.1)] and by[("lru", 0.3)] >= by[("lru", 0.1)]
    assert session.simulate("value+prefetch", 0.1).hit_rate > session.simulate("value", 0.1).hit_rate  # replayed
    acc = session.prediction_accuracy()
    assert acc.shape == (6, 2) and np.isnan(acc[0, 0]) and 0.5 < np.nanmean(acc[:, 0]) <= 1
    fig = session.sweep(policies=("lru", "value+prefetch"), budgets=(0.1, 0.3))
    assert len(fig.data) == 4 and "simulated rtx4090-24g" in fig.layout.annotations[1].text
    assert fig.data[2].line.dash == "dot" and fig.data[0].line.color != fig.data[2].line.color
    html = session._repr_html_()
    assert "simulated rtx4090-24g" in html and "experts on GPU" in html
    with pytest.raises(ValueError, match="budget"):
        session.place("frequency", budget=2.0)


def test_generate_streams_text(session, capsys):
    text = session.generate("A list comprehension", max_tokens=12)
    assert text and capsys.readouterr().out.startswith(text[:5])


def test_threshold_slider_changes_placement_and_heatmap(session):
    dash = widgets.Dashboard(session)
    dash.budget.value = 100  # the threshold alone decides
    z_before, marks_before = dash.heatmap_data()
    high = dash.threshold.value
    dash.threshold.value = dash.threshold.max / 20  # lower threshold: more experts are hot
    z_after, marks_after = dash.heatmap_data()
    assert len(marks_after) > len(marks_before) and np.array_equal(z_before, z_after)
    hot = np.argwhere(session.placement.gpu)
    assert {tuple(x) for x in hot} == {tuple(x) for x in marks_after}
    share = session.counts / session.counts.sum(axis=1, keepdims=True)
    assert np.all(share[session.placement.gpu] > dash.threshold.value) and high > dash.threshold.value
    before = dash.result.value
    dash.policy.value = "lru"
    assert dash.result.value != before and "simulated" in dash.result.value


def test_telemetry_throttles_but_keeps_history():
    from ktlab.lab.telemetry import Telemetry

    now = [0.0]
    tel = Telemetry(max_hz=10, clock=lambda: now[0])
    seen = []
    unsubscribe = tel.subscribe(seen.append)
    for step in range(100):  # 100 steps in 1 second
        now[0] = step / 100
        tel.publish(step=step)
    assert len(tel.history) == 100
    assert 9 <= len(seen) <= 11  # about 10 per second
    tel.flush()
    assert seen[-1]["step"] == 99  # the last update is never lost
    unsubscribe()
    tel.publish(step=100)
    assert seen[-1]["step"] == 99


def test_generate_publishes_telemetry(session):
    session.telemetry.history.clear()
    session.generate("The :mod:`json` module", max_tokens=8, stream=False)
    last = session.telemetry.history[-1]
    assert last["tokens"] >= 1 and last["decode_tok_s"] >= 0


def test_dashboard_generate_button_fills_the_throughput_plot(session):
    dash = widgets.Dashboard(session)
    dash.prompt.value = "The :mod:`os` module"
    dash.generate_job.start()
    assert dash.generate_job.button.disabled  # runs in a background thread
    dash.generate_job.wait(60)
    assert not dash.generate_job.button.disabled and "measured" in dash.generate_job.status.value
    measured = dash.throughput.data[0]
    assert len(measured.x) >= 1 and all(v >= 0 for v in measured.y) and list(measured.x) == sorted(measured.x)
    prefill = dash.throughput.data[1]
    last = session.telemetry.history[-1]
    assert len(prefill.y) == 1 and prefill.y[0] == pytest.approx(last["prefill_tok_s"])
    assert prefill.x[0] == pytest.approx(last["prefill_s"]) and 0 < prefill.x[0] < measured.x[0]  # prefill first
    assert "measured" in measured.name and "measured" in prefill.name


# ---- the dashboard's modeled plots, accelerator and batch controls ----------------------------------


@pytest.fixture()
def dash(session):
    d = widgets.Dashboard(session)
    yield d
    d.accelerator.value = "simulated:rtx4090-24g"  # the module's session is shared


def test_layer_split_repaints_with_the_placement_and_says_simulated(dash, session):
    from ktlab.lab.plots import layer_split_data

    dash.budget.value = 100
    dash.threshold.value = dash.threshold.max  # almost nothing is hot: the CPU does the work
    cold = layer_split_data(dash.split)
    np.testing.assert_allclose(cold["cpu"] / 1e3, session.layer_times()["decode"].cpu_s)
    dash.threshold.value = 0.0  # every used expert is hot
    hot = layer_split_data(dash.split)
    assert hot["cpu"].sum() < cold["cpu"].sum() and hot["gpu"].sum() > cold["gpu"].sum()
    assert len(hot["cpu"]) == session.cfg.num_layers and np.all(hot["wall"] <= hot["cpu"] + hot["gpu"] + hot["pcie"])
    assert "simulated rtx4090-24g" in dash.split.layout.title.text and "modeled" in dash.split.layout.title.text
    prefill = np.asarray(dash.split.data[6].y, dtype=float)  # the prefill chunk's PCIe bars
    np.testing.assert_allclose(prefill / 1e3, session.layer_times()["prefill"].pcie_s)


def test_modeled_throughput_moves_with_the_placement_next_to_the_measured(dash, session):
    from ktlab.lab.plots import MODELED_DECODE, MODELED_PREFILL, MODELED_RUNTIME

    def modeled():
        return {i: dash.throughput.data[i].y[0] for i in (MODELED_DECODE, MODELED_PREFILL, MODELED_RUNTIME)}

    dash.budget.value, dash.threshold.value = 100, dash.threshold.max
    before = modeled()
    dash.threshold.value = 0.0
    after = modeled()
    assert after[MODELED_DECODE] > before[MODELED_DECODE]  # more experts on the GPU: faster (modeled)
    assert after[MODELED_DECODE] == pytest.approx(session.layer_times()["decode"].tok_s)
    assert after[MODELED_RUNTIME] == before[MODELED_RUNTIME]  # the runtime policy ignores the static placement
    dash.budget.value = 30
    assert modeled()[MODELED_RUNTIME] != after[MODELED_RUNTIME]  # ... but not the budget
    for i in (MODELED_DECODE, MODELED_PREFILL, MODELED_RUNTIME):
        assert "modeled, simulated rtx4090-24g" in dash.throughput.data[i].name
        assert "measured" not in dash.throughput.data[i].name


def test_accelerator_dropdown_re_plans(dash, session):
    from ktlab.sched.cost import PROFILES

    assert set(dash.accelerator.options) == {f"simulated:{name}" for name in PROFILES}
    runtime_before = dash.result.value
    dash.accelerator.value = "simulated:rtx3090-24g"
    assert session.cost.gpu.name == "rtx3090-24g" and session.accelerator.label == "simulated rtx3090-24g"
    assert dash.result.value != runtime_before and "simulated rtx3090-24g" in dash.result.value
    assert "simulated rtx3090-24g" in dash.split.layout.title.text
    assert session.simulate("value").simulated == "rtx3090-24g"


def test_runtime_dropdown_offers_prefetch_with_the_prediction_accuracy(dash, session):
    assert {"value+prefetch", "belady+prefetch"} <= set(dash.policy.options)
    dash.policy.value = "value+prefetch"
    expected = np.nanmean(session.prediction_accuracy()[:, 0]) * 100
    assert "runtime value+prefetch" in dash.result.value and f"{expected:.1f}% of the selected" in dash.result.value
    dash.policy.value = "value"


def test_batch_slider_models_aggregate_throughput(dash, session):
    from ktlab.lab.plots import MODEL_RANDOM, MODEL_RECORDED, REPLAYED

    dash.batch.value = 8
    replay = dash.batch_plot.data[REPLAYED]
    assert tuple(replay.x) == (8,) and replay.y[0] == pytest.approx(session.layer_times(8)["decode"].tok_s)
    assert session.layer_times(8)["decode"].tokens == 8 and "B=8" in dash.result.value
    k, E = session.cfg.num_experts_per_tok, session.cfg.num_experts
    random = dash.batch_plot.data[MODEL_RANDOM]
    np.testing.assert_allclose(random.customdata, E * (1 - (1 - k / E) ** np.asarray(random.x)))
    recorded = np.asarray(dash.batch_plot.data[MODEL_RECORDED].y)
    assert np.all(np.diff(recorded) > 0)  # more concurrent tokens share expert reads
    assert "decode step of 8 token(s)" in dash.split.layout.annotations[0].text


def test_measure_button_adds_measured_engine_points(dash):
    from ktlab.lab.plots import IDEAL_BATCH, MEASURED_BATCH

    dash.measure_job.start()
    dash.measure_job.wait(120)
    points = dash.batch_plot.data[MEASURED_BATCH]
    assert list(points.x) == [1, 2, 4, 8, 16] and all(y > 0 for y in points.y), dash.measure_job.status.value
    assert points.y[-1] > points.y[0]  # batching pays on the real engine too
    assert "measured" in points.name and dash.measure_job.progress.value == 5
    ideal = dash.batch_plot.data[IDEAL_BATCH]  # the bandwidth-bound ideal of the same steps, beside them
    assert list(ideal.x) == [1, 2, 4, 8, 16] and all(i > m for i, m in zip(ideal.y, points.y, strict=True))
    assert all(0 < share < 1 for share in ideal.customdata) and "ideal" in dash.measure_job.status.value


def test_cache_panel_runs_the_chat_in_the_background(dash):
    panel = dash.cache
    panel.turns.value, panel.conversations.value = 2, 2
    panel.job.start()
    panel.job.wait(120)
    r = panel.result
    assert r is not None and r.completed, panel.job.status.value
    assert r.tiers == ["gpu(simulated)", "ram", "disk"] and len(r.prompt_tokens) == 2
    assert r.cached_tokens[1] > 0 and all(c <= p for c, p in zip(r.cached_tokens, r.prompt_tokens, strict=True))
    assert r.saved_tokens == sum(r.cached_tokens) and sum(r.hits.values()) > 0
    assert list(panel.figure.data[0].y) == [r.hits[t] for t in r.tiers]
    assert list(panel.figure.data[2].y) == r.cached_tokens
    assert panel.job.progress.max == 4 and "served from the cache" in panel.job.status.value


def test_chat_cache_with_every_tier_off_saves_nothing(session):
    from ktlab.lab.workloads import ChatCacheConfig

    r = session.chat_cache(ChatCacheConfig(gpu_mb=0, ram_mb=0, disk_mb=0, conversations=1, turns=2, max_tokens=4))
    assert r.tiers == [] and r.hits == {} and r.saved_tokens == 0 and r.prompt_tokens[1] > r.prompt_tokens[0]
    with pytest.raises(ValueError, match="page_size"):
        ChatCacheConfig(page_size=0)
    with pytest.raises(ValueError, match="gpu_mb"):
        ChatCacheConfig(gpu_mb=-1)


def test_stop_ends_a_generation_early(session):
    import itertools

    from ktlab.lab.telemetry import Telemetry

    telemetry, session.telemetry = session.telemetry, Telemetry(clock=itertools.count().__next__)  # every step due
    try:
        session.telemetry.subscribe(lambda m: session.stop())
        session.generate("A list comprehension", max_tokens=32, stream=False)
        assert session.telemetry.history[-1]["tokens"] == 1
    finally:
        session.telemetry = telemetry


def test_simulations_are_remembered_per_profile(session):
    first = session.simulate("lru", budget=0.2)
    assert session.simulate("lru", budget=0.2) is first
    session.set_accelerator("simulated:a100-80g")
    try:
        assert session.simulate("lru", budget=0.2).simulated == "a100-80g"
    finally:
        session.set_accelerator("simulated:rtx4090-24g")
    assert session.simulate("lru", budget=0.2) is first
    with pytest.raises(ValueError, match="accelerator"):
        session.set_accelerator("simulated:nope")


def test_threshold_drag_timing_is_recorded(dash, record_property):
    from ktlab.lab.repaint import time_threshold_drag

    dash.budget.value = 100
    t = time_threshold_drag(dash, steps=8)
    assert len(t.times) == 8 and all(s > 0 for s in t.times)
    assert list(t.gpu_experts) == sorted(t.gpu_experts) and t.gpu_experts[-1] > t.gpu_experts[0]
    record_property("threshold_move_median_ms", round(t.median_s * 1e3, 2))  # recorded, never asserted
    print(f"threshold move: median {t.median_s * 1e3:.1f} ms, max {t.max_s * 1e3:.1f} ms")


# ---- widgets never touch the engine -----------------------------------------------------------------

WIDGET_MODULES = ("widgets", "cache_panel", "background", "plots")


def test_widget_modules_reach_the_model_only_through_the_session():
    import ast
    from pathlib import Path

    lab = Path(__file__).resolve().parent.parent / "ktlab" / "lab"
    for name in WIDGET_MODULES:
        tree = ast.parse((lab / f"{name}.py").read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        banned = [m for m in imported if m and m.split(".")[0] == "torch" or m and m.startswith(
            ("ktlab.serve", "ktlab.runtime", "ktlab.model", "ktlab.kernels"))]
        assert not banned, f"ktlab/lab/{name}.py imports {banned}"
        touched = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & {"model", "engine", "tokenizer"}
        assert not touched, f"ktlab/lab/{name}.py touches .{touched}"


def test_importing_the_dashboard_loads_no_engine():
    import subprocess
    import sys

    code = ("import sys, ktlab.lab.widgets, ktlab.lab.cache_panel; "
            "print([m for m in sys.modules if m.startswith('ktlab.serve')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gpu_experts_per_layer_slider_sets_the_budget_and_moves_vram(session, dash):
    """The per-layer slider and VRAM % are one budget: moving either re-plans, the other follows."""
    dash.strategy.value = "frequency"
    cfg = session.cfg
    dash.per_layer.value = 5
    assert session.placement.num_gpu_experts == 5 * cfg.num_layers
    assert dash.budget.value == round(100 * 5 / cfg.num_experts)
    assert int(dash.heatmap_data()[1].shape[0]) == 5 * cfg.num_layers  # the heatmap marks them
    dash.budget.value = 50
    assert dash.per_layer.value == cfg.num_experts // 2
    assert session.placement.num_gpu_experts == cfg.num_experts // 2 * cfg.num_layers
