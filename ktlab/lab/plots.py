"""Plotly figures of the lab: the placement heatmap and hit rate vs VRAM budget per policy.

Builders return ``go.FigureWidget`` (live in JupyterLab: the dashboard updates their data in
place); ``update_*`` functions repaint an existing one.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ktlab.sched.placement import ExpertPlacement


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


def hit_rate_curves(rows: list[dict]) -> go.FigureWidget:
    """Hit rate vs budget, one line per policy; rows have policy, budget, hit_rate."""
    fig = go.FigureWidget()
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["budget"])
        fig.add_scatter(x=[r["budget"] * 100 for r in mine], y=[r["hit_rate"] * 100 for r in mine],
                        mode="lines+markers", name=policy)
    fig.update_layout(title="Expert hit rate vs VRAM budget", xaxis_title="GPU experts (% of all)",
                      yaxis_title="hit rate (%)", height=320, margin={"t": 40, "b": 40})
    return fig


def throughput_figure() -> go.FigureWidget:
    """Measured decode tok/s over generated tokens (filled in by :func:`append_throughput`)."""
    fig = go.FigureWidget()
    fig.add_scatter(x=[], y=[], mode="lines", name="decode tok/s (measured)")
    fig.update_layout(title="Throughput while generating", xaxis_title="generated tokens", yaxis_title="tok/s",
                      height=260, margin={"t": 40, "b": 40})
    return fig


def append_throughput(fig: go.FigureWidget, metrics: dict) -> None:
    """Add one telemetry record (``tokens``, ``decode_tok_s``) to :func:`throughput_figure`."""
    if metrics.get("tokens", 0) < 2:  # the first token's speed is the prefill's
        return
    trace = fig.data[0]
    with fig.batch_update():
        trace.x = (*trace.x, metrics["tokens"])
        trace.y = (*trace.y, metrics["decode_tok_s"])
