"""The dashboard: controls that re-plan the placement and repaint the plots.

Widgets only call :class:`ktlab.lab.session.Session` methods (which own the model and the engine)
and watch its telemetry; they never reach into the engine. Every placement control re-makes the
static placement (heatmap), re-prices it per layer (CPU / GPU / PCIe bars), redraws the modeled
throughput (next to the measured one) and the batch-size curves, and replays the recorded trace
through the chosen runtime policy; modeled numbers carry the accelerator's label ("simulated ..."
unless it is a real GPU), measured ones say "measured".
"""

from __future__ import annotations

import html
import tempfile
import time

import ipywidgets as w
import numpy as np

from ktlab.lab.background import BackgroundJob, Progress
from ktlab.lab.cache_panel import CachePanel
from ktlab.lab.plots import (
    activation_share,
    append_throughput,
    batch_figure,
    clear_throughput,
    hit_rate_curves,
    layer_split_figure,
    modeled,
    placement_heatmap,
    set_measured_batch,
    set_modeled_throughput,
    throughput_figure,
    update_batch_model,
    update_heatmap,
    update_layer_split,
)
from ktlab.lab.session import ACCELERATORS, BATCHES

STRATEGIES = ("threshold", "frequency", "uniform", "front-loading", "random")
POLICIES = ("static:frequency", "redistribute", "lru", "lfu", "value", "belady", "value+prefetch", "belady+prefetch")
MAX_TOKENS = 64  # per dashboard generation


class Dashboard:
    """Sliders and dropdowns over a Session, with live plots of the placement and what it buys."""

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
        experts = session.cfg.num_experts
        self.per_layer = w.IntSlider(value=round(session.budget * experts), min=0, max=experts, step=1,
                                     description="GPU experts/layer", continuous_update=False,
                                     style={"description_width": "initial"})
        self._budget = session.budget  # share of all experts: set by either budget slider
        self._syncing = False
        real = session.accelerator_spec
        accelerators = (*ACCELERATORS, real) if real in ("cuda", "torch:cpu") else ACCELERATORS
        self.accelerator = w.Dropdown(options=accelerators, value=session.accelerator_spec, description="accelerator")
        self.policy = w.Dropdown(options=POLICIES, value="value", description="runtime")
        self.deferral = w.IntSlider(value=0, min=0, max=session.cfg.num_experts_per_tok - 1, description="deferral",
                                    continuous_update=False)
        self.batch = w.SelectionSlider(options=BATCHES, value=1, description="batch B", continuous_update=False)
        self.result = w.HTML()
        self.export_button = w.Button(description="export flags", icon="download")
        self.export_out = w.Output()
        self.sweep_button = w.Button(description="sweep budgets", icon="line-chart")
        self.sweep_box = w.VBox()
        self.heatmap = placement_heatmap(session.counts, session.placement)
        self.split = layer_split_figure()
        self.batch_plot = batch_figure()
        self.measure_job = BackgroundJob("measure batches", "tachometer", self._measure, self._show_measured,
                                         tooltip="measured: the engine with B concurrent requests on this CPU")
        self.prompt = w.Text(value="A list comprehension", description="prompt")
        self.generate_job = BackgroundJob("generate", "play", self._generate, self._show_text)
        self.stop_button = w.Button(description="stop", icon="stop")
        self.text_out = w.Output()
        self.throughput = throughput_figure()
        self.cache = CachePanel(session)
        self.last_refresh_s = 0.0
        self.refreshes = 0
        self._unsubscribe = session.telemetry.subscribe(self._on_metrics)
        self.stop_button.on_click(lambda _button: session.stop())
        self.export_button.on_click(self._export)
        self.sweep_button.on_click(self._sweep)
        self.budget.observe(self._budget_changed, names="value")
        self.per_layer.observe(self._budget_changed, names="value")
        for control in (self.strategy, self.threshold, self.accelerator, self.policy, self.deferral, self.batch):
            control.observe(self._changed, names="value")
        self.widget = self._layout()
        self.refresh()

    def _layout(self) -> w.VBox:
        """The threshold slider is the first slider on the page (the browser test drags it)."""
        controls = w.VBox([self.strategy, self.threshold, self.budget, self.per_layer, self.accelerator, self.policy,
                           self.deferral, self.batch, w.HBox([self.export_button, self.sweep_button])],
                          layout={"min_width": "420px", "flex": "0 0 auto"})
        self.result.layout = {"flex": "1 1 auto"}
        generation = w.VBox([w.HBox([self.prompt, self.generate_job.widget, self.stop_button]), self.text_out,
                             self.throughput])
        return w.VBox([w.HBox([controls, self.result]), self.heatmap, self.split,
                       w.VBox([self.batch_plot, self.measure_job.widget]), self.export_out, self.sweep_box,
                       generation, self.cache.widget])

    def _changed(self, change) -> None:
        self.refresh()

    def _budget_changed(self, change) -> None:
        """The VRAM % and GPU-experts-per-layer sliders are two views of one budget: the one moved
        sets it (per layer: exactly that many experts of every layer), the other follows quietly."""
        if self._syncing:
            return
        experts = self.session.cfg.num_experts
        if change["owner"] is self.per_layer:
            self._budget = self.per_layer.value / experts
            other, value = self.budget, round(self._budget * 100)
        else:
            self._budget = self.budget.value / 100
            other, value = self.per_layer, round(self._budget * experts)
        self._syncing = True
        try:
            other.value = value
        finally:
            self._syncing = False
        self.refresh()

    def refresh(self) -> None:
        """Re-plan from the controls and repaint (the time it took is kept in ``last_refresh_s``)."""
        t0 = time.perf_counter()
        s = self.session
        if self.accelerator.value != s.accelerator_spec:
            s.set_accelerator(self.accelerator.value)
        params = {"t": self.threshold.value} if self.strategy.value == "threshold" else {}
        self.threshold.disabled = self.strategy.value != "threshold"
        placement = s.place(self.strategy.value, self._budget, **params)
        update_heatmap(self.heatmap, s.counts, placement)
        batch = self.batch.value
        times = s.layer_times(batch)
        single = times["decode"] if batch == 1 else s.layer_times(1)["decode"]
        r = s.simulate(self.policy.value, deferral=self.deferral.value)
        label = s.accelerator.label
        update_layer_split(self.split, times["decode"], times["prefill"], label)
        set_modeled_throughput(self.throughput, single.tok_s, times["prefill"].tok_s, r.decode_tok_s,
                               self.policy.value, label)
        update_batch_model(self.batch_plot, s.batch_model(), batch, times["decode"].tok_s, label)
        self.refreshes += 1
        self.last_refresh_s = time.perf_counter() - t0
        self.result.value = (f"{self._summary(placement, times, single, r, label)}<br><small>re-planned and "
                             f"repainted in {self.last_refresh_s * 1e3:.0f} ms (kernel side)</small>"
                             f"<!-- refresh {self.refreshes} -->")  # always new: the browser test times it

    def _summary(self, placement, times, single, r, label: str) -> str:
        s, tag = self.session, html.escape(modeled(label))
        per_layer = placement.num_gpu_experts / s.cfg.num_moe_layers
        return (
            f"<b>placement</b>: {placement.num_gpu_experts} GPU experts ({placement.strategy}, "
            f"{per_layer:.1f} per layer), serves {placement.hit_rate(s.counts) * 100:.1f}% of recorded routing; "
            f"decode {single.tok_s:,.0f} tok/s, prefill {times['prefill'].tok_s:,.0f} tok/s, "
            f"B={times['decode'].tokens}: {times['decode'].tok_s:,.0f} tok/s aggregate ({tag})<br>"
            f"<b>runtime {html.escape(self.policy.value)}</b>: hit rate {r.hit_rate * 100:.1f}%, "
            f"{r.transfers_per_token:.1f} copies/token, decode {r.decode_tok_s:,.0f} tok/s, "
            f"prefill {r.prefill_tok_s or 0:,.0f} tok/s ({tag})<br>"
            f"{self._prediction_line()}"
            f"all-CPU: {r.cpu_only_tok_s:,.0f} tok/s ({tag})"
        )

    def _prediction_line(self) -> str:
        """The recorded trace's next-layer prediction accuracy (what +prefetch acts on), measured."""
        trace = self.session.trace
        if trace is None or trace.predicted is None:
            return ""
        acc = trace.accuracy()[:, 0]
        return (f"<b>next-layer prediction</b>: {np.nanmean(acc) * 100:.1f}% of the selected experts named from the "
                f"previous layer's hidden state (measured on the recorded routing)<br>")

    # -- background work (through the Session only) --------------------------------------------
    def _on_metrics(self, metrics: dict) -> None:
        append_throughput(self.throughput, metrics)
        self.generate_job.progress.max = MAX_TOKENS
        self.generate_job.progress.value = min(MAX_TOKENS, metrics.get("tokens", 0))

    def _generate(self, _progress: Progress) -> str:
        clear_throughput(self.throughput)
        return self.session.generate(self.prompt.value, max_tokens=MAX_TOKENS, stream=False)

    def _show_text(self, text: str) -> str:
        self.text_out.clear_output()
        with self.text_out:
            print(self.prompt.value + text)
        last = self.session.telemetry.history[-1] if self.session.telemetry.history else {}
        return (f"{last.get('tokens', 0)} tokens: prefill {last.get('prefill_tok_s', 0):,.0f} tok/s, "
                f"decode {last.get('decode_tok_s', 0):,.0f} tok/s (measured, this CPU)")

    def _measure(self, progress: Progress) -> list[dict]:
        return self.session.measure_batch(progress=progress)

    def _show_measured(self, rows: list[dict]) -> str:
        set_measured_batch(self.batch_plot, rows)
        best = max(rows, key=lambda r: r["decode_tok_s"])
        share = (f", {best['share_of_ideal']:.0%} of its bandwidth-bound ideal {best['ideal_tok_s']:,.0f} tok/s"
                 if "ideal_tok_s" in best else "")
        return f"measured: up to {best['decode_tok_s']:,.0f} tok/s at B={best['batch']} (engine, this CPU){share}"

    def _export(self, _button) -> None:
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

    # -- what the figures hold (tests, benchmarks) ----------------------------------------------
    def heatmap_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(frequency z, GPU-resident (layer, expert) pairs) as the figure holds them (for tests)."""
        z = np.asarray(self.heatmap.data[0].z)
        marks = np.stack([np.asarray(self.heatmap.data[1].y), np.asarray(self.heatmap.data[1].x)], axis=1)
        return z, marks
