"""Synthetic routing traces with controllable skew and temporal locality.

The generator is a "sticky router": at every token and layer, expert e gets the score

    log p[l, e] + a * [e chosen at t-1] + b * [e chosen in t-2 .. t-W] + Gumbel noise

and the top-k scores are the token's experts (sampling k distinct experts from the
softmax of the first three terms, by the Gumbel-top-k trick). ``p[l]`` is a Zipf law of
exponent ``skew`` over a random permutation of each layer's experts; ``a`` and ``b`` set
how often the next token reuses the previous token's experts and those of the last few.
Vectorised over layers, so a 48-layer trace of a thousand tokens takes a fraction of a second.

:data:`PRESETS` holds one preset calibrated to published Qwen3-30B-A3B figures (see
:func:`trace_figures`; test_traces checks them) and a uniform control.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ktlab.config import check_positive_ints


@dataclass(frozen=True)
class TraceSpec:
    """Parameters of a synthetic trace (see the module docstring)."""

    num_layers: int
    num_experts: int
    top_k: int
    skew: float = 1.0  # Zipf exponent of each layer's popularity (0 = uniform)
    stick_prev: float = 0.0  # score bonus of the previous token's experts (a)
    stick_window: float = 0.0  # score bonus of the experts of tokens t-2 .. t-window (b)
    window: int = 8
    drift_every: int = 0  # every N tokens, swap a few experts' popularity (topic drift); 0 = never
    name: str = "custom"

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_layers", "num_experts", "top_k", "window"))
        if self.top_k > self.num_experts:
            raise ValueError(f"TraceSpec.top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.skew < 0 or self.stick_prev < 0 or self.stick_window < 0 or self.drift_every < 0:
            raise ValueError("TraceSpec.skew, stick_prev, stick_window and drift_every must be >= 0")

    def to_dict(self) -> dict:
        """Plain dict (stored in a trace file's metadata)."""
        return asdict(self)


#: Calibrated presets. ``qwen3-30b-a3b`` matches (see docs/benchmarks.md) the published
#: figures for Qwen3-30B-A3B decode: about 45% of a token's experts reused by the next token,
#: about 80% within 8 tokens, LRU hit rates of about 37% / 74% / 89% with 5% / 15% / 30% of
#: experts resident.
PRESETS: dict[str, TraceSpec] = {
    "qwen3-30b-a3b": TraceSpec(48, 128, 8, skew=0.75, stick_prev=2.2, stick_window=1.9, window=8,
                               name="qwen3-30b-a3b"),
    "uniform": TraceSpec(48, 128, 8, skew=0.0, name="uniform"),
}


def popularity(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """[L, E] per-layer Zipf probabilities over a random permutation of the experts."""
    ranks = np.arange(1, spec.num_experts + 1, dtype=np.float64) ** -spec.skew
    p = np.stack([ranks[rng.permutation(spec.num_experts)] for _ in range(spec.num_layers)])
    return p / p.sum(axis=1, keepdims=True)


def generate_trace(spec: TraceSpec, tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A trace ``ids`` [tokens, L, k] int16 and its routing weights [tokens, L, k] float32.

    Weights are the softmax of the chosen experts' scores, renormalised over the k (as with
    ``norm_topk_prob``), in descending order per token, like a real router's top-k.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    rng = np.random.default_rng(seed)
    L, E, k = spec.num_layers, spec.num_experts, spec.top_k
    logp = np.log(popularity(spec, rng))
    ids = np.zeros((tokens, L, k), dtype=np.int16)
    weights = np.zeros((tokens, L, k), dtype=np.float32)
    last = np.full((L, E), -(10**9), dtype=np.int64)  # token index of each expert's last use
    rows = np.arange(L)[:, None]
    for t in range(tokens):
        if spec.drift_every and t and t % spec.drift_every == 0:
            swap = rng.integers(0, E, size=(L, 2))
            a, b = logp[np.arange(L), swap[:, 0]].copy(), logp[np.arange(L), swap[:, 1]].copy()
            logp[np.arange(L), swap[:, 0]], logp[np.arange(L), swap[:, 1]] = b, a
        age = t - last
        score = logp + spec.stick_prev * (age == 1) + spec.stick_window * ((age >= 2) & (age <= spec.window))
        noisy = score + rng.gumbel(size=(L, E))
        top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
        order = np.argsort(-score[rows, top], axis=1, kind="stable")
        top = top[rows, order]
        s = score[rows, top]
        w = np.exp(s - s.max(axis=1, keepdims=True))
        weights[t] = w / w.sum(axis=1, keepdims=True)
        ids[t] = top
        last[rows, top] = t
    return ids, weights


def trace_figures(trace: np.ndarray, num_experts: int, fractions=(0.05, 0.15, 0.30)) -> dict[str, float]:
    """The calibration figures of a trace: next-token reuse, reuse within 8 tokens, LRU hit
    rates at each resident ``fraction`` of experts (per layer)."""
    from ktlab.sched.cache import hit_rate
    from ktlab.sched.stats import reuse_rate

    out = {"reuse_1": float(reuse_rate(trace, 1).mean()), "reuse_8": float(reuse_rate(trace, 8).mean())}
    for f in fractions:
        out[f"lru_{round(f * 100)}"] = hit_rate(trace, "lru", int(round(f * num_experts)), num_experts)
    return out


#: Next-layer prediction accuracy given to synthetic traces (share of a token's experts named from
#: the previous layer's hidden state; a layers ahead: this to the power a). Below FATE's ~97% for
#: real models (arXiv 2502.12224), above what the bundled tiny model reaches (see docs/benchmarks.md).
SYNTHETIC_ACCURACY = 0.9


def synthetic_predictions(ids: np.ndarray, num_experts: int, accuracy: float = SYNTHETIC_ACCURACY, ahead: int = 2,
                          seed: int = 0) -> np.ndarray:
    """[tokens, L, ahead, k] int16 predictions for a synthetic trace ``ids`` [tokens, L, k]: each of a
    token's experts at layer l is named a layers ahead with probability ``accuracy ** a`` (in its
    place, heaviest first), else replaced by an expert the token does not select; -1 for l < a."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"prediction accuracy must be in [0, 1], got {accuracy}")
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids).astype(np.int64)
    T, L, k = ids.shape
    out = np.full((T, L, ahead, k), -1, dtype=np.int16)
    for a in range(1, ahead + 1):
        named = rng.random((T, L, k)) < accuracy**a
        # a random expert outside the token's selection: shift a random draw past the selected ids
        other = rng.integers(0, num_experts - k, size=(T, L, k)) if num_experts > k else np.zeros((T, L, k), int)
        chosen = np.sort(ids, axis=2)
        for j in range(k):
            other = other + (other >= chosen[:, :, j : j + 1])
        pred = np.where(named, ids, other)
        out[:, a:, a - 1] = pred[:, a:]
    return out
