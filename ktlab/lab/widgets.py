"""The dashboard: controls that re-plan the placement and repaint the plots.

Widgets only call :class:`ktlab.lab.session.Session` methods (which own the model); they never
reach into the engine. Every change re-makes the static placement (heatmap) and replays the
recorded trace through the chosen policy (numbers labeled "simulated" unless the accelerator
is a real GPU).
"""

from __future__ import annotations

import html

import ipywidgets as w
import numpy as np

from ktlab.lab.plots import (
    activation_share,
    append_throughput,
    hit_rate_curves,
    placement_heatmap,
    throughput_figure,
    update_heatmap,
)

STRATEGIES = ("threshold", "frequency", "uniform", "front-loading", "random")
POLICIES = ("static:frequency", "redistribute", "lru", "lfu", "value", "belady")


class Dashboard:
    """Sliders and dropdowns over a Session, with a live heatmap and the modeled result."""

    def __init__(self, session) -> None:
        if session.trace is None:
            session.record()
        self.session = session
        share = activation_share(session.counts)
        top = float(share.max()) if share.size else 1.0
        self.strategy = w.Dropdown(options=STRATEGIES, value="threshold", description="placement")
        self.threshold = w.FloatSlider(value=round(top / 4, 4), min=0.0, max=round(top, 4), step=round(top / 200, 5),
                                       readout_format=".2%", description="hot if share >", continuous_update=False)
        self.budget = w.IntSlider(value=round(session.budget * 100), min=0, max=100, step=1, description="VRAM %",
                                  continuous_update=False)
        self.policy = w.Dropdown(options=POLICIES, value="value", description="runtime")
        self.deferral = w.IntSlider(value=0, min=0, max=session.cfg.num_experts_per_tok - 1, description="deferral",
                                    continuous_update=False)
        self.result = w.HTML()
        self.export_button = w.Button(description="export flags", icon="download")
        self.export_out = w.Output()
        self.sweep_button = w.Button(description="sweep budgets", icon="line-chart")
        self.sweep_box = w.VBox()
        self.heatmap = placement_heatmap(session.counts, session.placement)
        self.prompt = w.Text(value="A list comprehension", description="prompt")
        self.generate_button = w.Button(description="generate", icon="play")
        self.text_out = w.Output()
        self.throughput = throughput_figure()
        self._unsubscribe = session.telemetry.subscribe(lambda m: append_throughput(self.throughput, m))
        self.generate_button.on_click(self._generate)
        for control in (self.strategy, self.threshold, self.budget, self.policy, self.deferral):
            control.observe(self._changed, names="value")
        self.export_button.on_click(self._export)
        self.sweep_button.on_click(self._sweep)
        controls = w.VBox([self.strategy, self.threshold, self.budget, self.policy, self.deferral,
                           w.HBox([self.export_button, self.sweep_button])])
        generation = w.VBox([w.HBox([self.prompt, self.generate_button]), self.text_out, self.throughput])
        self.widget = w.VBox([w.HBox([controls, self.result]), self.heatmap, self.export_out, self.sweep_box,
                              generation])
        self.refresh()

    def _changed(self, change) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-plan from the controls and repaint."""
        s = self.session
        params = {"t": self.threshold.value} if self.strategy.value == "threshold" else {}
        self.threshold.disabled = self.strategy.value != "threshold"
        placement = s.place(self.strategy.value, self.budget.value / 100, **params)
        update_heatmap(self.heatmap, s.counts, placement)
        r = s.simulate(self.policy.value, deferral=self.deferral.value)
        static_hit = placement.hit_rate(s.counts)
        label = s.accelerator.label
        self.result.value = (
            f"<b>placement</b>: {placement.num_gpu_experts} GPU experts ({placement.strategy}), "
            f"serves {static_hit * 100:.1f}% of recorded routing<br>"
            f"<b>runtime {html.escape(self.policy.value)}</b>: hit rate {r.hit_rate * 100:.1f}%, "
            f"{r.transfers_per_token:.1f} copies/token, decode {r.decode_tok_s:.0f} tok/s, "
            f"prefill {r.prefill_tok_s or 0:.0f} tok/s ({html.escape(label)})<br>"
            f"all-CPU: {r.cpu_only_tok_s:.0f} tok/s ({html.escape(label)} cost model)"
        )

    def _generate(self, _button) -> None:
        """Generate in a background thread: the kernel stays responsive; telemetry feeds the plot."""
        import threading

        self.generate_button.disabled = True
        with self.throughput.batch_update():
            self.throughput.data[0].x, self.throughput.data[0].y = (), ()

        def run() -> None:
            try:
                text = self.session.generate(self.prompt.value, max_tokens=64, stream=False)
                self.text_out.clear_output()
                with self.text_out:
                    print(self.prompt.value + text)
            finally:
                self.generate_button.disabled = False

        threading.Thread(target=run, daemon=True).start()

    def _export(self, _button) -> None:
        import tempfile

        result = self.session.export("all", tempfile.mkdtemp(prefix="ktlab-export-"))
        self.export_out.clear_output()
        with self.export_out:
            print(result.summary)

    def _sweep(self, _button) -> None:
        self.sweep_button.disabled = True
        try:
            self.sweep_box.children = [w.HTML("<i>sweeping budgets...</i>")]
            self.sweep_box.children = [hit_rate_curves(self.session.sweep(plot=False))]
        finally:
            self.sweep_button.disabled = False

    def heatmap_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(frequency z, GPU-resident (layer, expert) pairs) as the figure holds them (for tests)."""
        z = np.asarray(self.heatmap.data[0].z)
        marks = np.stack([np.asarray(self.heatmap.data[1].y), np.asarray(self.heatmap.data[1].x)], axis=1)
        return z, marks

