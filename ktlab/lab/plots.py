"""Plotly figures of the lab: placement heatmap, hit rate vs budget, per-layer time split, throughput
(measured next to modeled), batch size, prefix-cache tiers.

Builders return ``go.FigureWidget`` (live in JupyterLab: the dashboard updates their data in
place); ``update_*`` / ``set_*`` functions repaint an existing one. Modeled figures carry the
accelerator's label (``modeled, simulated rtx4090-24g``); measured ones say "measured".
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ktlab.sched.placement import ExpertPlacement
from ktlab.sched.simulate import LayerSplit

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
COLORS = {"cpu": "#1f77b4", "gpu": "#2ca02c", "pcie": "#ff7f0e", "wall": "black", "measured": "#d62728"}


def activation_share(counts: np.ndarray) -> np.ndarray:
    """[L, E] share of each layer's routed slots that each expert took."""
    counts = np.asarray(counts, dtype=float)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def placement_heatmap(counts: np.ndarray, placement: ExpertPlacement, title: str = "") -> go.FigureWidget:
    """Layer x expert heatmap of activation frequency, GPU-resident experts marked."""
    fig = go.FigureWidget()
    fig.add_heatmap(z=activation_share(counts), colorscale="Viridis", colorbar={"title": "share"},
                    hovertemplate="layer %{y}, expert %{x}: %{z:.1%} of slots<extra></extra>", name="frequency")
    fig.add_scatter(mode="markers", marker={"symbol": "square-open", "color": "white", "size": 7},
                    name="on GPU", hovertemplate="layer %{y}, expert %{x}: on the GPU<extra></extra>")
    fig.update_layout(title=title or "Placement: activation frequency (color), GPU-resident (squares)",
                      xaxis_title="expert", yaxis_title="layer", height=320, margin={"t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    update_heatmap(fig, counts, placement)
    return fig


def update_heatmap(fig: go.FigureWidget, counts: np.ndarray, placement: ExpertPlacement) -> None:
    """Repaint ``fig`` (from :func:`placement_heatmap`) with new counts and residency."""
    layers, experts = np.nonzero(placement.gpu)
    with fig.batch_update():
        fig.data[0].z = activation_share(counts)
        fig.data[1].x = experts
        fig.data[1].y = layers


def hit_rate_curves(rows: list[dict], label: str | None = None) -> go.FigureWidget:
    """Hit rate vs budget, one line per policy (rows have policy, budget, hit_rate); beside it the
    modeled decode tok/s when rows have ``decode_tok_s_simulated`` (``label`` names the source)."""
    speed = all("decode_tok_s_simulated" in r for r in rows)
    if speed:
        fig = _subplots(("expert hit rate (%)", f"decode tok/s ({modeled(label or 'simulated')})"), height=340)
    else:
        fig = go.FigureWidget()
    bases = list(dict.fromkeys(r["policy"].removesuffix("+prefetch") for r in rows))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["budget"])
        x = [r["budget"] * 100 for r in mine]
        color = PALETTE[bases.index(policy.removesuffix("+prefetch")) % len(PALETTE)]  # a policy and its +prefetch
        dash = "dot" if policy.endswith("+prefetch") else None
        line = {"color": color, "dash": dash}
        fig.add_scatter(x=x, y=[r["hit_rate"] * 100 for r in mine], mode="lines+markers", name=policy,
                        line=line, legendgroup=policy, **({"row": 1, "col": 1} if speed else {}))
        if speed:
            fig.add_scatter(x=x, y=[r["decode_tok_s_simulated"] for r in mine], mode="lines+markers", name=policy,
                            line=line, legendgroup=policy, showlegend=False, row=1, col=2)
    fig.update_layout(title="Expert caches vs VRAM budget (dotted: prefetching the predicted experts)",
                      height=340, margin={"t": 60, "b": 40})
    fig.update_xaxes(title_text="GPU experts (% of all)")
    if not speed:
        fig.update_yaxes(title_text="hit rate (%)")
    return fig


def modeled(label: str) -> str:
    """How a modeled figure names its source: ``modeled, simulated rtx4090-24g`` (or ``modeled, cuda H200``)."""
    return f"modeled, {label}"


def _subplots(titles: tuple[str, str], **layout) -> go.FigureWidget:
    fig = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.12))
    fig.update_layout(margin={"t": 60, "b": 40}, **layout)
    return fig


# ---- per-layer time split ------------------------------------------------------------------------

SPLIT_PARTS = ("cpu", "gpu", "pcie")
SPLIT_NAMES = {"cpu": "CPU experts", "gpu": "GPU (dense + experts)", "pcie": "PCIe copies", "wall": "layer wall time"}


def layer_split_figure() -> go.FigureWidget:
    """Stacked CPU / GPU / PCIe busy ms per layer, a decode step (left) and a prefill chunk (right),
    with each layer's wall time (the parts overlap); filled in by :func:`update_layer_split`."""
    fig = _subplots(("decode step", "prefill"), barmode="stack", height=300, legend={"orientation": "h", "y": -0.25})
    for col in (1, 2):
        for part in (*SPLIT_PARTS, "wall"):
            trace = (go.Scatter(mode="markers", marker={"symbol": "line-ew-open", "size": 18, "color": COLORS[part]})
                     if part == "wall" else go.Bar(marker_color=COLORS[part]))
            trace.update(name=SPLIT_NAMES[part], legendgroup=part, showlegend=col == 1,
                         hovertemplate=f"layer %{{x}}: %{{y:.4f}} ms {SPLIT_NAMES[part]}<extra></extra>")
            fig.add_trace(trace, row=1, col=col)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text="ms", col=1)
    return fig


def update_layer_split(fig: go.FigureWidget, decode: LayerSplit, prefill: LayerSplit, label: str) -> None:
    """Repaint :func:`layer_split_figure` with the splits of the current placement."""
    layers = np.arange(len(decode.wall_s))
    with fig.batch_update():
        for offset, split in ((0, decode), (4, prefill)):
            for i, part in enumerate((*SPLIT_PARTS, "wall")):
                fig.data[offset + i].x = layers
                fig.data[offset + i].y = getattr(split, f"{part}_s") * 1e3
        # titles change only with the batch size or the profile: a layout change redraws the whole figure
        fig.layout.annotations[0].text = f"decode step of {decode.tokens} token(s)"
        fig.layout.annotations[1].text = f"prefill of {prefill.tokens} tokens"
        fig.layout.title = f"Per-layer time split of the placement ({modeled(label)})"


def layer_split_data(fig: go.FigureWidget) -> dict[str, np.ndarray]:
    """The decode bars as the figure holds them: part -> ms per layer (for tests)."""
    return {part: np.asarray(fig.data[i].y, dtype=float) for i, part in enumerate((*SPLIT_PARTS, "wall"))}


# ---- throughput: measured next to modeled --------------------------------------------------------

MEASURED_DECODE, MEASURED_PREFILL, MODELED_DECODE, MODELED_PREFILL, MODELED_RUNTIME = range(5)


def throughput_figure() -> go.FigureWidget:
    """Decode and prefill tok/s over the seconds of a generation: measured (filled in by
    :func:`append_throughput`) next to the modeled ones (:func:`set_modeled_throughput`)."""
    fig = go.FigureWidget()
    fig.add_scatter(x=[], y=[], mode="lines+markers", name="decode tok/s (measured, this CPU)",
                    line={"color": COLORS["measured"]})
    fig.add_scatter(x=[], y=[], mode="markers", name="prefill tok/s (measured, this CPU)",
                    marker={"symbol": "diamond", "size": 10, "color": COLORS["measured"]})
    for name, dash, color in (("decode", "dash", COLORS["gpu"]), ("prefill", "dot", COLORS["gpu"]),
                              ("runtime decode", "dashdot", COLORS["cpu"])):
        fig.add_scatter(x=[], y=[], mode="lines", name=f"{name} tok/s (modeled)", line={"dash": dash, "color": color})
    fig.update_layout(title="Throughput: measured while generating, next to the modeled placement",
                      xaxis_title="seconds since the prompt", yaxis_title="tok/s", yaxis_type="log", height=300,
                      margin={"t": 40, "b": 40})
    return fig


def _span(fig: go.FigureWidget) -> tuple[float, float]:
    xs = [*fig.data[MEASURED_DECODE].x, *fig.data[MEASURED_PREFILL].x]
    return 0.0, max([1.0, *xs])


def set_modeled_throughput(fig: go.FigureWidget, decode: float, prefill: float, runtime: float, policy: str,
                           label: str) -> None:
    """Draw the modeled tok/s (placement decode and prefill, ``policy``'s decode) as flat lines (the
    legend names the source; the values are in the hover and the dashboard's summary)."""
    x = _span(fig)
    with fig.batch_update():
        for index, value, name in ((MODELED_DECODE, decode, "decode, placement"),
                                   (MODELED_PREFILL, prefill, "prefill, placement"),
                                   (MODELED_RUNTIME, runtime, f"decode, runtime {policy}")):
            fig.data[index].x, fig.data[index].y = x, (value, value)
            fig.data[index].name = f"{name} ({modeled(label)})"


def clear_throughput(fig: go.FigureWidget) -> None:
    """Forget the measured points (a new generation starts)."""
    with fig.batch_update():
        for index in (MEASURED_DECODE, MEASURED_PREFILL):
            fig.data[index].x, fig.data[index].y = (), ()


def append_throughput(fig: go.FigureWidget, metrics: dict) -> None:
    """Add one telemetry record (``tokens``, ``elapsed_s``, ``decode_tok_s``, ``prefill_tok_s``,
    ``prefill_s``) to :func:`throughput_figure`."""
    with fig.batch_update():
        prefill = fig.data[MEASURED_PREFILL]
        if not prefill.x and metrics.get("prefill_tok_s", 0) > 0:
            prefill.x, prefill.y = (metrics.get("prefill_s", 0.0),), (metrics["prefill_tok_s"],)
        if metrics.get("tokens", 0) >= 2:  # the first token's speed is the prefill's
            decode = fig.data[MEASURED_DECODE]
            decode.x = (*decode.x, metrics["elapsed_s"])
            decode.y = (*decode.y, metrics["decode_tok_s"])
        x = _span(fig)
        for index in (MODELED_DECODE, MODELED_PREFILL, MODELED_RUNTIME):
            if fig.data[index].y:
                fig.data[index].x = x


# ---- batch size ------------------------------------------------------------------------------------

MODEL_RECORDED, MODEL_RANDOM, REPLAYED, MEASURED_BATCH, IDEAL_BATCH = range(5)


def batch_figure() -> go.FigureWidget:
    """Aggregate decode tok/s vs concurrent tokens B: modeled with the recorded and with random
    routing, the trace replay at the chosen B, and measured engine points."""
    fig = go.FigureWidget()
    fig.add_scatter(x=[], y=[], mode="lines+markers", name="modeled, recorded routing", line={"color": COLORS["gpu"]},
                    hovertemplate="B=%{x}: %{y:,.0f} tok/s, %{customdata:.1f} experts/layer<extra></extra>")
    fig.add_scatter(x=[], y=[], mode="lines", name="modeled, random routing", line={"dash": "dash",
                    "color": COLORS["cpu"]},
                    hovertemplate="B=%{x}: %{y:,.0f} tok/s, %{customdata:.1f} experts/layer<extra></extra>")
    fig.add_scatter(x=[], y=[], mode="markers", name="trace replay at B", marker={"size": 12, "symbol": "x",
                    "color": "black"})
    fig.add_scatter(x=[], y=[], mode="markers+lines", name="measured: engine, every expert on this CPU",
                    marker={"color": COLORS["measured"]}, line={"dash": "dot"})
    fig.add_scatter(x=[], y=[], mode="markers+lines", name="bandwidth-bound ideal of those steps (this CPU)",
                    marker={"color": COLORS["measured"], "symbol": "triangle-up"}, line={"dash": "dashdot"},
                    customdata=[], hovertemplate="B=%{x}: ideal %{y:,.0f} tok/s, measured %{customdata:.0%} of it"
                    "<extra></extra>")
    fig.update_layout(title="Aggregate decode throughput vs batch size", xaxis_title="concurrent decode tokens B",
                      xaxis_type="log", yaxis_title="tok/s", yaxis_type="log", height=300, margin={"t": 40, "b": 40})
    return fig


def update_batch_model(fig: go.FigureWidget, model: dict[str, np.ndarray], batch: int, replay_tok_s: float,
                       label: str) -> None:
    """Repaint the modeled curves (``Session.batch_model``) and the replay marker at ``batch``."""
    with fig.batch_update():
        for index, key in ((MODEL_RECORDED, "recorded"), (MODEL_RANDOM, "random")):
            fig.data[index].x, fig.data[index].y = model["batch"], model[key]
            fig.data[index].customdata = model[f"distinct_{key}"]
            fig.data[index].name = f"{key} routing ({modeled(label)})"
        fig.data[REPLAYED].x, fig.data[REPLAYED].y = (batch,), (replay_tok_s,)
        fig.data[REPLAYED].name = f"trace replay at B={batch} ({modeled(label)})"


def set_measured_batch(fig: go.FigureWidget, rows: list[dict]) -> None:
    """Draw measured engine points (``Session.measure_batch`` rows)."""
    ideal = [r for r in rows if "ideal_tok_s" in r]
    with fig.batch_update():
        fig.data[MEASURED_BATCH].x = [r["batch"] for r in rows]
        fig.data[MEASURED_BATCH].y = [r["decode_tok_s"] for r in rows]
        fig.data[IDEAL_BATCH].x = [r["batch"] for r in ideal]
        fig.data[IDEAL_BATCH].y = [r["ideal_tok_s"] for r in ideal]
        fig.data[IDEAL_BATCH].customdata = [r["share_of_ideal"] for r in ideal]


# ---- prefix-cache tiers ------------------------------------------------------------------------------


def prefix_cache_figure() -> go.FigureWidget:
    """Page hits per tier (left) and per-turn prompt tokens vs tokens served from the cache (right)."""
    fig = _subplots(("page hits per tier (measured)", "prompt tokens per turn (measured)"), height=300,
                    barmode="group", legend={"orientation": "h", "y": -0.25})
    fig.add_bar(x=[], y=[], name="page hits", marker_color=COLORS["gpu"], row=1, col=1)
    fig.add_bar(x=[], y=[], name="prompt tokens", marker_color=COLORS["cpu"], row=1, col=2)
    fig.add_bar(x=[], y=[], name="served from the cache (not prefilled)", marker_color=COLORS["pcie"], row=1, col=2)
    fig.update_xaxes(title_text="turn", dtick=1, col=2)
    return fig


def update_prefix_cache(fig: go.FigureWidget, result) -> None:
    """Repaint :func:`prefix_cache_figure` from a ``ChatCacheResult``."""
    turns = np.arange(1, len(result.prompt_tokens) + 1)
    with fig.batch_update():
        fig.data[0].x = [name.replace("(", " (") for name in result.tiers] or ["(no tier)"]
        fig.data[0].y = [result.hits.get(name, 0) for name in result.tiers] or [0]
        fig.data[1].x, fig.data[1].y = turns, result.prompt_tokens
        fig.data[2].x, fig.data[2].y = turns, result.cached_tokens
        fig.layout.title = (f"Prefix cache on a multi-turn chat: {result.saved_tokens} of "
                            f"{sum(result.prompt_tokens)} prompt tokens not prefilled")


def loss_figure(title: str = "fine-tuning loss (measured)") -> go.FigureWidget:
    """Training loss per step (a line that :func:`append_loss` extends live)."""
    fig = go.FigureWidget()
    fig.add_scatter(x=[], y=[], mode="lines", name="train loss")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="cross-entropy", height=320)
    return fig


def append_loss(fig: go.FigureWidget, step: int, loss: float) -> None:
    """Add one step's loss to :func:`loss_figure`'s line."""
    line = fig.data[0]
    line.x = (*line.x, step)
    line.y = (*line.y, loss)
