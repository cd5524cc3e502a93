"""The accuracy cost of expert deferral: top-1 agreement and perplexity vs the exact model.

With deferral ``d``, each token's ``d`` lowest-weight experts of a layer join the residual
stream one layer late (KTransformers' ``--kt-max-deferred-experts-per-token``), so the CPU
can finish them while the GPU runs the next layer. That changes the model's function; this
measures by how much on real text (teacher-forced, so every position is compared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeferralRow:
    """One deferral setting: ``top1`` = share of positions whose argmax equals the exact model's."""

    deferral: int
    tokens: int
    top1_agreement: float
    perplexity: float


def _logits(model, ids: list[int]) -> torch.Tensor:
    return model.forward(torch.tensor(ids), model.new_cache(len(ids)))


def measure_deferral(model, tokenizer, texts: list[str], deferrals=(0, 1, 2),
                     max_tokens: int = 256) -> list[DeferralRow]:
    """Rows for each deferral (0 is the exact model: agreement 1 by definition)."""
    top_k = model.cfg.num_experts_per_tok
    for d in deferrals:
        if not 0 <= d < top_k:
            raise ValueError(f"deferral must be in [0, {top_k - 1}] (top-{top_k} routing), got {d}")
    docs = [ids for ids in (tokenizer.encode(t)[:max_tokens] for t in texts) if len(ids) > 1]
    if not docs:
        raise ValueError("no text of two tokens or more to measure on")
    saved = model.deferral
    try:
        model.deferral = 0
        reference = [_logits(model, ids) for ids in docs]
        rows = []
        for d in deferrals:
            model.deferral = d
            agree = nll = 0.0
            for ids, ref in zip(docs, reference, strict=True):
                logits = ref if d == 0 else _logits(model, ids)
                agree += float((logits.argmax(-1) == ref.argmax(-1)).sum())
                logp = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])
                nll -= float(logp.sum())
            positions = sum(len(ids) for ids in docs)
            predictions = positions - len(docs)  # next-token predictions with a known target
            rows.append(DeferralRow(d, positions, agree / positions, math.exp(nll / predictions)))
        return rows
    finally:
        model.deferral = saved


def format_rows(rows: list[DeferralRow]) -> str:
    """A small table."""
    lines = [f"{'deferral':>8} {'tokens':>7} {'top-1 agreement':>16} {'perplexity':>11}"]
    lines += [f"{r.deferral:>8} {r.tokens:>7} {r.top1_agreement * 100:>15.1f}% {r.perplexity:>11.2f}" for r in rows]
    return "\n".join(lines)
