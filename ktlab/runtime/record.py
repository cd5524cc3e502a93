"""Record a model's routing on prompts into a :class:`~ktlab.sched.stats.Trace`, with the
predictions of each layer's experts made from earlier layers' hidden states."""

from __future__ import annotations

import numpy as np
import torch

from ktlab.model.lookahead import PredictionRecorder, RouterLookahead
from ktlab.sched.stats import Trace, WeightedRecorder

DEFAULT_AHEAD = 2


def record_trace(model, tokenizer, texts: list[str], max_tokens: int = 512, meta: dict | None = None,
                 ahead: int = DEFAULT_AHEAD) -> Trace:
    """Run ``model`` over each text (teacher-forced prefill, up to ``max_tokens`` tokens each)
    and return the routing of all their tokens, in order, with the routing weights and the
    experts predicted 1..``ahead`` layers ahead (:class:`~ktlab.model.lookahead.RouterLookahead`;
    0: none)."""
    cfg = model.cfg
    L, k = cfg.num_moe_layers, cfg.num_experts_per_tok
    ids_all, w_all, pred_all = [], [], []
    for text in texts:
        tokens = tokenizer.encode(text)[:max_tokens]
        if not tokens:
            continue
        rec = WeightedRecorder(L, k)
        predictions = PredictionRecorder(L, ahead, k) if ahead else None
        lookahead = RouterLookahead(model, ahead, predictions) if ahead else None
        model.add_route_observer(rec)
        try:
            model.forward(torch.tensor(tokens), model.new_cache(len(tokens)), last_only=True)
        finally:
            model.remove_route_observer(rec)
            if lookahead is not None:
                lookahead.detach()
        ids, w = rec.trace()
        ids_all.append(ids)
        w_all.append(w)
        if predictions is not None:
            pred_all.append(predictions.predicted(len(ids)))
    if not ids_all:
        raise ValueError("no tokens to record: every text was empty")
    info = {"texts": len(ids_all), "tokens_per_text_max": max_tokens, "hidden_size": cfg.hidden_size,
            "moe_intermediate_size": cfg.moe_intermediate_size, "first_moe_layer": cfg.first_dense_layers,
            "lookahead": ahead, **(meta or {})}
    predicted = np.concatenate(pred_all) if pred_all else None
    return Trace(np.concatenate(ids_all), cfg.num_experts, np.concatenate(w_all), info, predicted)
