"""Activation statistics and routing traces (pure numpy; the model feeds it through an observer).

A trace is an int16 array [tokens, layers, k] of selected expert ids, in token order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutingRecorder:
    """Collects routing decisions from ``Model.add_route_observer`` into a trace.

    Works for prefill (many tokens per call) and decode (one per call) alike: rows of each
    layer are appended in order, so row i of every layer is the same token.
    """

    num_layers: int
    top_k: int
    _rows: list[list[np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        self._rows = [[] for _ in range(self.num_layers)]

    def __call__(self, layer: int, ids, weights) -> None:
        """The observer: ``ids`` [T, k] (torch or numpy) for ``layer``."""
        self._rows[layer].append(np.asarray(ids, dtype=np.int16).reshape(-1, self.top_k))

    def trace(self) -> np.ndarray:
        """[tokens, layers, k] int16."""
        per_layer = [np.concatenate(r) if r else np.zeros((0, self.top_k), np.int16) for r in self._rows]
        n = min(len(r) for r in per_layer)
        return np.stack([r[:n] for r in per_layer], axis=1)


def activation_counts(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts] number of times each expert was selected."""
    tokens, layers, k = trace.shape
    counts = np.zeros((layers, num_experts), dtype=np.int64)
    for layer in range(layers):
        counts[layer] = np.bincount(trace[:, layer].ravel().astype(np.int64), minlength=num_experts)
    return counts


def reuse_rate(trace: np.ndarray, window: int = 1) -> np.ndarray:
    """Per layer: mean fraction of a token's experts already selected within the previous ``window`` tokens."""
    tokens, layers, k = trace.shape
    if tokens <= window:
        return np.zeros(layers)
    rates = np.zeros(layers)
    for layer in range(layers):
        sel = trace[:, layer]
        hits = 0
        for t in range(window, tokens):
            recent = sel[t - window : t].ravel()
            hits += np.isin(sel[t], recent).sum()
        rates[layer] = hits / ((tokens - window) * k)
    return rates


def top_share(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per layer: share of all activations taken by the most-used ``fraction`` of experts."""
    n = max(1, int(round(counts.shape[1] * fraction)))
    ordered = -np.sort(-counts, axis=1)
    return ordered[:, :n].sum(axis=1) / np.maximum(counts.sum(axis=1), 1)


TRACE_FORMAT = "ktlab-trace-1"


@dataclass(frozen=True)
class Trace:
    """A routing trace with its metadata: ``ids`` [tokens, L, k] int16, ``weights`` (same
    shape, float32, optional), ``num_experts`` and free-form ``meta`` (model, prompt set, ...).
    ``predicted`` [tokens, L, A, k] int16 (optional): ``predicted[t, l, a - 1]`` are the experts layer
    l's router picks from the hidden state of layer l - a (its predictions a layers ahead, heaviest
    first; -1 where there is no such layer), see :func:`prediction_accuracy`."""

    ids: np.ndarray
    num_experts: int
    weights: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    predicted: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.ids.ndim != 3:
            raise ValueError(f"a trace's ids must be [tokens, layers, k], got shape {self.ids.shape}")
        if self.weights is not None and self.weights.shape != self.ids.shape:
            raise ValueError(f"trace weights {self.weights.shape} do not match ids {self.ids.shape}")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.num_experts):
            raise ValueError(
                f"trace expert ids must be in [0, {self.num_experts}), got {self.ids.min()}..{self.ids.max()}"
            )
        p = self.predicted
        if p is not None and (p.ndim != 4 or p.shape[:2] != self.ids.shape[:2] or p.shape[3] != self.ids.shape[2]):
            raise ValueError(f"trace predictions must be [tokens, layers, ahead, k] matching ids {self.ids.shape}, "
                             f"got {p.shape}")
        if p is not None and p.size and (p.min() < -1 or p.max() >= self.num_experts):
            raise ValueError(f"trace predictions must be expert ids or -1, got {p.min()}..{p.max()}")

    def accuracy(self) -> np.ndarray:
        """[L, A] :func:`prediction_accuracy` of the stored predictions (ValueError without any)."""
        if self.predicted is None:
            raise ValueError("this trace has no predictions (record it again with `ktlab record`)")
        return prediction_accuracy(self.ids, self.predicted)

    def counts(self) -> np.ndarray:
        """[L, E] activation counts."""
        return activation_counts(self.ids, self.num_experts)

    def save(self, path) -> None:
        """Write a ``.npz`` (ids, weights, metadata as JSON)."""
        import json

        arrays = {"ids": self.ids.astype(np.int16)}
        if self.weights is not None:
            arrays["weights"] = self.weights.astype(np.float32)
        if self.predicted is not None:
            arrays["predicted"] = self.predicted.astype(np.int16)
        meta = {"format": TRACE_FORMAT, "num_experts": self.num_experts, **self.meta}
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path) -> Trace:
        """Read a trace written by :meth:`save`; a bad file is a ``ValueError`` naming it."""
        import json
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                ids = data["ids"]
                weights = data.get("weights", None)
                predicted = data.get("predicted", None)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such trace file") from None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a ktlab trace ({type(exc).__name__}: {exc})") from None
        if meta.pop("format", None) != TRACE_FORMAT:
            raise ValueError(f"{path}: not a ktlab trace (format {TRACE_FORMAT!r} expected)")
        return cls(ids.astype(np.int16), int(meta.pop("num_experts")), weights, meta,
                   None if predicted is None else predicted.astype(np.int16))


def prediction_accuracy(ids: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """[L, A]: per layer and distance, the mean share of a token's k selected experts that the
    prediction named (|predicted & selected| / k); NaN where no earlier layer predicts (l < a)."""
    ids, predicted = np.asarray(ids), np.asarray(predicted)
    T, L, A, k = predicted.shape
    hit = (predicted[:, :, :, :, None] == ids[:, :, None, None, :]).any(axis=4)  # [T, L, A, k] per predicted slot
    valid = predicted[:, :, :, 0] >= 0  # [T, L, A]
    named = hit.sum(axis=3) / k
    out = np.full((L, A), np.nan)
    for layer in range(L):
        for a in range(A):
            rows = valid[:, layer, a]
            if rows.any():
                out[layer, a] = float(named[rows, layer, a].mean())
    return out


@dataclass
class WeightedRecorder(RoutingRecorder):
    """A :class:`RoutingRecorder` that keeps the routing weights too."""

    _weights: list[list[np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._weights = [[] for _ in range(self.num_layers)]

    def __call__(self, layer: int, ids, weights) -> None:
        super().__call__(layer, ids, weights)
        self._weights[layer].append(np.asarray(weights, dtype=np.float32).reshape(-1, self.top_k))

    def trace(self) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        """([tokens, layers, k] int16 ids, same-shape float32 weights)."""
        ids = super().trace()
        n = ids.shape[0]
        w = np.stack([np.concatenate(r)[:n] for r in self._weights], axis=1)
        return ids, w


def accuracy_json(accuracy: np.ndarray) -> list[list[float | None]]:
    """A [L, A] :func:`prediction_accuracy` for JSON (None where no earlier layer predicts)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in accuracy]


def format_accuracy(accuracy: np.ndarray) -> str:
    """Lines for a [L, A] :func:`prediction_accuracy`: per distance, the mean and every layer's figure."""
    lines = []
    for a in range(accuracy.shape[1]):
        col = accuracy[:, a]
        per_layer = " ".join("-" if np.isnan(v) else f"{v * 100:.0f}" for v in col)
        mean = float(np.nanmean(col)) * 100 if np.any(~np.isnan(col)) else float("nan")
        lines.append(f"prediction {a + 1} layer{'s' if a else ''} ahead: {mean:.1f}% of the selected experts named "
                     f"(per layer %: {per_layer})")
    return "\n".join(lines)
