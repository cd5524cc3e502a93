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
    shape, float32, optional), ``num_experts`` and free-form ``meta`` (model, prompt set, ...)."""

    ids: np.ndarray
    num_experts: int
    weights: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids.ndim != 3:
            raise ValueError(f"a trace's ids must be [tokens, layers, k], got shape {self.ids.shape}")
        if self.weights is not None and self.weights.shape != self.ids.shape:
            raise ValueError(f"trace weights {self.weights.shape} do not match ids {self.ids.shape}")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.num_experts):
            raise ValueError(
                f"trace expert ids must be in [0, {self.num_experts}), got {self.ids.min()}..{self.ids.max()}"
            )

    def counts(self) -> np.ndarray:
        """[L, E] activation counts."""
        return activation_counts(self.ids, self.num_experts)

    def save(self, path) -> None:
        """Write a ``.npz`` (ids, weights, metadata as JSON)."""
        import json

        arrays = {"ids": self.ids.astype(np.int16)}
        if self.weights is not None:
            arrays["weights"] = self.weights.astype(np.float32)
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
        except FileNotFoundError:
            raise ValueError(f"{path}: no such trace file") from None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a ktlab trace ({type(exc).__name__}: {exc})") from None
        if meta.pop("format", None) != TRACE_FORMAT:
            raise ValueError(f"{path}: not a ktlab trace (format {TRACE_FORMAT!r} expected)")
        return cls(ids.astype(np.int16), int(meta.pop("num_experts")), weights, meta)


def record_trace(model, tokenizer, texts: list[str], max_tokens: int = 512, meta: dict | None = None) -> Trace:
    """Run ``model`` over each text (teacher-forced prefill, up to ``max_tokens`` tokens each)
    and return the routing of all their tokens, in order, with the routing weights."""
    import torch

    cfg = model.cfg
    ids_all, w_all = [], []
    for text in texts:
        tokens = tokenizer.encode(text)[:max_tokens]
        if not tokens:
            continue
        rec = WeightedRecorder(cfg.num_moe_layers, cfg.num_experts_per_tok)
        model.add_route_observer(rec)
        try:
            model.forward(torch.tensor(tokens), model.new_cache(len(tokens)), last_only=True)
        finally:
            model.remove_route_observer(rec)
        ids, w = rec.trace()
        ids_all.append(ids)
        w_all.append(w)
    if not ids_all:
        raise ValueError("no tokens to record: every text was empty")
    info = {"texts": len(ids_all), "tokens_per_text_max": max_tokens, "hidden_size": cfg.hidden_size,
            "moe_intermediate_size": cfg.moe_intermediate_size, "first_moe_layer": cfg.first_dense_layers,
            **(meta or {})}
    return Trace(np.concatenate(ids_all), cfg.num_experts, np.concatenate(w_all), info)


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
