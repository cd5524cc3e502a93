"""Predicting the next layer's experts and prefetching them: the lookahead against Hugging Face's
routers, prediction accuracy, traces with predictions, the cache's prefetch, the prefetcher's
bound, and prefetching policies in the simulator (the oracle beats demand caching)."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab.sched.cache import make_policy
from ktlab.sched.cost import DEFAULT_CPU, ExpertCost, get_profile
from ktlab.sched.prefetch import Prefetcher, StepTimeline, split_policy
from ktlab.sched.simulate import SimConfig, simulate
from ktlab.sched.stats import Trace, format_accuracy, prediction_accuracy
from ktlab.sched.traces import PRESETS, generate_trace, synthetic_predictions

COST = ExpertCost.for_shape(2048, 768, 34 / 32, get_profile("rtx4090-24g"), DEFAULT_CPU)


def test_lookahead_is_the_next_layers_router_on_this_hidden_state(gguf_f32, hf_model):
    """RouterLookahead's prediction for layer l + a equals Hugging Face's router of layer l + a (after
    its post-attention norm) applied to the residual stream entering layer l's MoE, captured by a hook."""
    import torch

    from ktlab.model import load_model
    from ktlab.model.lookahead import PredictionRecorder, RouterLookahead

    model, tok = load_model(gguf_f32, experts="torch")
    ids = tok.encode("The quick brown fox jumps over the lazy dog. def main(): return 42")
    L, k = model.cfg.num_moe_layers, model.cfg.num_experts_per_tok
    rec = PredictionRecorder(L, 2, k)
    lookahead = RouterLookahead(model, 2, rec)
    model.forward(torch.tensor(ids), model.new_cache(len(ids)))
    lookahead.detach()
    assert all(not block.lookaheads for block in model.moe_blocks())
    ours = rec.predicted(len(ids))

    captured = {}
    layers = hf_model.model.layers
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, args[0][0])) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            hf_model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for layer in range(L):
            for a in (1, 2):
                target = layer + a
                if target >= L:
                    continue
                normed = layers[target].post_attention_layernorm(captured[layer])
                _, _, ref = layers[target].mlp.gate(normed)
                assert np.array_equal(np.sort(ours[:, target, a - 1], -1), np.sort(ref.numpy(), -1))
    assert (ours[:, 0] == -1).all() and (ours[:, 1, 1] == -1).all()  # no earlier layer predicts these


def test_prediction_accuracy_counts_named_experts():
    ids = np.array([[[0, 1], [2, 3], [4, 5]]])  # 1 token, 3 layers, top-2
    predicted = np.full((1, 3, 2, 2), -1)
    predicted[0, 1, 0] = [3, 9]  # layer 1 from layer 0: one of two named
    predicted[0, 2, 0] = [5, 4]  # layer 2 from layer 1: both (order does not matter)
    predicted[0, 2, 1] = [7, 8]  # layer 2 from layer 0: none
    acc = prediction_accuracy(ids, predicted)
    assert np.isnan(acc[0]).all() and np.isnan(acc[1, 1])
    assert acc[1, 0] == 0.5 and acc[2, 0] == 1.0 and acc[2, 1] == 0.0
    text = format_accuracy(acc)
    assert "1 layer ahead: 75.0%" in text and "2 layers ahead: 0.0%" in text and "- 50 100" in text


def test_synthetic_predictions_have_the_asked_accuracy_and_name_only_other_experts():
    ids, _ = generate_trace(PRESETS["qwen3-30b-a3b"], 120, seed=3)
    pred = synthetic_predictions(ids, 128, accuracy=0.8, ahead=2, seed=1)
    acc = np.nanmean(prediction_accuracy(ids, pred), axis=0)
    assert acc[0] == pytest.approx(0.8, abs=0.02) and acc[1] == pytest.approx(0.64, abs=0.02)
    wrong = (pred[:, 1:, 0] != ids[:, 1:]) & (pred[:, 1:, 0] >= 0)
    selected = (pred[:, 1:, 0][..., None] == ids[:, 1:, None, :]).any(-1)
    assert wrong.any() and not (wrong & selected).any()  # a miss names an expert the token does not use
    with pytest.raises(ValueError, match="accuracy"):
        synthetic_predictions(ids, 128, accuracy=1.5)


def test_trace_keeps_its_predictions(tmp_path):
    ids, w = generate_trace(PRESETS["qwen3-30b-a3b"], 16)
    pred = synthetic_predictions(ids, 128)
    path = tmp_path / "t.npz"
    Trace(ids, 128, w, {"x": 1}, pred).save(path)
    back = Trace.load(path)
    assert np.array_equal(back.predicted, pred) and back.accuracy().shape == (48, 2)
    with pytest.raises(ValueError, match="ahead, k"):
        Trace(ids, 128, w, predicted=pred[:, :, :, :3])
    with pytest.raises(ValueError, match="no predictions"):
        Trace(ids, 128, w).accuracy()


@pytest.mark.parametrize("policy", ["lru", "lfu", "value", "belady"])
def test_cache_prefetch_evicts_the_least_valued_unprotected_and_keeps_the_budget(policy):
    rng = np.random.default_rng(0)
    trace = rng.integers(0, 16, size=(40, 2, 2))
    cache = make_policy(policy, 2, 16, 4, trace=trace)
    for t in range(20):
        cache.step(trace[t])
    before = cache.resident[1].copy()
    keep = cache.retention()[1]
    protect = [int(np.flatnonzero(before)[0])]
    wanted = [e for e in range(16) if not before[e]][:3]
    admitted, evicted = cache.prefetch(1, wanted, protect=protect)
    assert admitted == wanted and len(evicted) == 3 and protect[0] not in evicted
    assert cache.resident[1].sum() <= 4 and all(cache.resident[1, admitted])
    spare = [e for e in np.flatnonzero(before) if e not in protect]
    assert sorted(keep[evicted].tolist()) == sorted(keep[spare])[:3]  # the lowest retention went first
    assert cache.prefetch(1, [int(np.flatnonzero(~cache.resident[1])[0])], protect=range(16)) == ([], [])
    if policy == "value":  # a worth below every resident's value admits nothing
        outside = [e for e in range(16) if not cache.resident[0, e]]
        assert cache.prefetch(0, outside, worth={e: -1.0 for e in range(16)})[0] == []


def test_prefetcher_issues_what_the_previous_layer_hides():
    cache = make_policy("lru", 3, 32, 12)
    prefetcher = Prefetcher(cache, COST)
    timeline = StepTimeline(COST)
    cpu_heavy = np.arange(8)  # layer 0: all misses, no fetching: the CPU runs eight experts
    timeline.run_layer(0, cpu_heavy, np.ones(8, dtype=np.int64), np.zeros(8, dtype=bool), max_fetch=0)
    window = timeline.clock + timeline.dense_s - timeline.expert_start
    admitted, _ = prefetcher.issue(timeline, 1, np.arange(10, 20))
    assert len(admitted) == int(np.ceil(window / COST.t_pcie())) < 10
    assert timeline.link == pytest.approx(timeline.expert_start + len(admitted) * COST.t_pcie())
    selected = np.arange(10, 18)  # 18 and 19 were mispredicted
    resident = cache.resident[1, selected]
    assert resident.all()  # every selected expert was prefetched: all hits
    prefetcher.observe(1, selected)
    assert prefetcher.useful == 8 and prefetcher.precision == pytest.approx(9 / 11)


def test_prefetching_policies_in_the_simulator():
    spec = PRESETS["qwen3-30b-a3b"]
    ids, w = generate_trace(spec, 64, seed=2)
    pred = synthetic_predictions(ids, spec.num_experts)[:, :, 0]
    assert split_policy("value+prefetch") == ("value", True) and split_policy("lru") == ("lru", False)
    with pytest.raises(ValueError, match="needs the trace's predictions"):
        simulate(ids, 128, COST, SimConfig("value+prefetch", 0.1, prefill_tokens=0), w)
    with pytest.raises(ValueError, match="unknown policy"):
        SimConfig("static:uniform+prefetch", 0.1)
    on_demand = simulate(ids, 128, COST, SimConfig("belady", 0.1, prefill_tokens=0), w)
    oracle = simulate(ids, 128, COST, SimConfig("belady+prefetch", 0.1, prefill_tokens=0), w)
    assert oracle.decode_tok_s > on_demand.decode_tok_s  # knowing the next layer beats demand caching
    value = simulate(ids, 128, COST, SimConfig("value", 0.1, prefill_tokens=0), w)
    prefetched = simulate(ids, 128, COST, SimConfig("value+prefetch", 0.1, prefill_tokens=0), w, pred)
    assert prefetched.hit_rate > value.hit_rate and prefetched.decode_tok_s > value.decode_tok_s
