"""The lab Session and its dashboard (widget logic, not the browser)."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab.lab import Session

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
    html = session._repr_html_()
    assert "simulated rtx4090-24g" in html and "experts on GPU" in html
    with pytest.raises(ValueError, match="budget"):
        session.place("frequency", budget=2.0)


def test_generate_streams_text(session, capsys):
    text = session.generate("A list comprehension", max_tokens=12)
    assert text and capsys.readouterr().out.startswith(text[:5])


def test_threshold_slider_changes_placement_and_heatmap(session):
    dash = pytest.importorskip("ktlab.lab.widgets").Dashboard(session)
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
    import time

    dash = pytest.importorskip("ktlab.lab.widgets").Dashboard(session)
    dash.prompt.value = "The :mod:`os` module"
    dash._generate(None)
    deadline = time.time() + 60
    while dash.generate_button.disabled and time.time() < deadline:  # runs in a background thread
        time.sleep(0.05)
    assert not dash.generate_button.disabled
    assert len(dash.throughput.data[0].x) >= 1 and all(v >= 0 for v in dash.throughput.data[0].y)
