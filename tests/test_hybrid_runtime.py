"""The live hybrid runtime: identical tokens to all-CPU generation; same decisions as the simulator."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab.model import load_model, open_weights
from ktlab.runtime.generate import SamplingConfig, generate
from ktlab.runtime.hybrid import HybridConfig, attach_hybrid
from ktlab.sched.simulate import SimConfig, simulate
from ktlab.sched.stats import WeightedRecorder

PROMPT = [5, 17, 42, 99, 7, 64, 3, 150]
STEPS = 24


@pytest.fixture(scope="module")
def reference_tokens(gguf_q8):
    model, _ = load_model(gguf_q8)
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    return tokens


@pytest.mark.parametrize("policy,budget", [("lru", 0.25), ("value", 0.5), ("lfu", 0.1), ("static:frequency", 0.3),
                                           ("static:uniform", 1.0)])
def test_hybrid_tokens_equal_all_cpu(gguf_q8, reference_tokens, policy, budget):
    model, _ = load_model(gguf_q8)
    counts = np.arange(model.cfg.num_layers * model.cfg.num_experts).reshape(model.cfg.num_layers, -1) % 5
    hybrid = attach_hybrid(model, open_weights(gguf_q8), HybridConfig(policy=policy, budget=budget, counts=counts))
    recorder = WeightedRecorder(model.cfg.num_layers, model.cfg.num_experts_per_tok)
    model.add_route_observer(recorder)
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    assert tokens == reference_tokens
    stats = hybrid.stats
    cfg = model.cfg
    assert stats.tokens == STEPS - 1 and stats.lookups == (STEPS - 1) * cfg.num_layers * cfg.num_experts_per_tok
    assert "simulated rtx4090-24g" in stats.summary()
    if budget == 1.0:
        assert stats.hit_rate == 1.0
    # the simulator, replaying the decode routing the model really made, decides the same
    ids, weights = recorder.trace()
    decode, decode_w = ids[len(PROMPT):], weights[len(PROMPT):]
    if not policy.startswith("static:"):
        sim = simulate(decode, cfg.num_experts, hybrid.cost, SimConfig(policy, budget, prefill_tokens=0), decode_w)
        assert sim.hit_rate == pytest.approx(stats.hit_rate, abs=1e-12)
        assert sim.transfers_per_token * decode.shape[0] == pytest.approx(stats.copies)
        assert sim.decode_ms_per_token == pytest.approx(1e3 / stats.modeled_tok_s, rel=1e-9)


def test_bad_hybrid_configs(gguf_q8):
    with pytest.raises(ValueError, match="needs the future"):
        HybridConfig(policy="belady")
    with pytest.raises(ValueError, match="budget"):
        HybridConfig(budget=1.5)
    model, _ = load_model(gguf_q8)
    with pytest.raises(ValueError, match="no CUDA GPU|unknown accelerator"):
        attach_hybrid(model, open_weights(gguf_q8), HybridConfig(accelerator="cuda"))


def test_deferral_changes_the_model_a_little(gguf_q8, test_tokenizer):
    from ktlab.benchmarks.deferral import measure_deferral

    model, tok = load_model(gguf_q8)
    texts = ["The quick brown fox jumps over the lazy dog.", "def main(): return 42"]
    rows = measure_deferral(model, tok, texts, (0, 1))  # the test model routes top-2
    assert rows[0].top1_agreement == 1.0
    exact = rows[0].perplexity
    assert all(0.0 < r.top1_agreement <= 1.0 for r in rows)
    assert rows[1].perplexity != exact  # deferring changes the function
    assert model.deferral == 0  # restored
    with pytest.raises(ValueError, match="deferral must be"):
        measure_deferral(model, tok, texts, (model.cfg.num_experts_per_tok,))


def test_deferral_zero_is_the_exact_model(gguf_q8):
    import torch

    model, _ = load_model(gguf_q8)
    ids = torch.tensor(PROMPT)
    exact = model.forward(ids, model.new_cache(len(PROMPT)))
    model.deferral = 1
    deferred = model.forward(ids, model.new_cache(len(PROMPT)))
    assert not torch.allclose(exact, deferred)
    model.deferral = 0
    assert torch.equal(model.forward(ids, model.new_cache(len(PROMPT))), exact)


def test_simulated_split_gives_the_all_cpu_logits_bit_for_bit(gguf_q8):
    """The simulated GPU shares the CPU's C++ engine, so a split layer runs as one call: the
    logits equal the all-CPU ones exactly, not just the greedy tokens."""
    import torch

    reference, _ = load_model(gguf_q8)
    model, _ = load_model(gguf_q8)
    hybrid = attach_hybrid(model, open_weights(gguf_q8), HybridConfig(policy="lru", budget=0.3))
    tokens = torch.tensor(PROMPT)
    np.testing.assert_array_equal(model.forward(tokens, model.new_cache(16)).numpy(),
                                  reference.forward(tokens, reference.new_cache(16)).numpy())
    cache_a, cache_b = model.new_cache(16), reference.new_cache(16)
    model.forward(tokens, cache_a), reference.forward(tokens, cache_b)
    for t in (3, 9, 27):  # decode steps: some experts resident on the simulated GPU, some not
        one = torch.tensor([t])
        np.testing.assert_array_equal(model.forward(one, cache_a).numpy(), reference.forward(one, cache_b).numpy())
    assert 0 < hybrid.stats.hits < hybrid.stats.lookups


def _masked_deferral_forward(self, x, defer=0):
    """The reference: every slot computed twice with its weight zeroed in one of the sums."""
    import torch

    ids, weights = self.route(x)
    if defer <= 0:
        return self.forward_routed(x, ids, weights), None
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(self.top_k).expand_as(order))
    keep = rank < self.top_k - defer
    cpu = self.backends["cpu"]
    every = np.arange(cpu.experts.n_experts)
    later = cpu.forward(x, ids, weights * ~keep, every)
    return cpu.forward(x, ids, weights * keep, every), type("Done", (), {"result": lambda _: later})()


@pytest.mark.parametrize("policy,budget", [("lru", 0.25), ("static:frequency", 0.5)])
def test_live_deferral_equals_the_masked_sum_and_the_simulators_time(gguf_q8, monkeypatch, policy, budget):
    """Deferral in the live hybrid runtime: the placement is asked once per layer, the deferred
    experts' C++ share is submitted and joins the next layer; the logits equal a reference that
    masks the deferred slots' weights in two full sums (bit for bit: a simulated GPU shares the
    engine), and the modeled time is the simulator's with the same deferral."""
    import torch

    from ktlab.model.layers import MoEBlock

    model, _ = load_model(gguf_q8)
    counts = np.arange(model.cfg.num_layers * model.cfg.num_experts).reshape(model.cfg.num_layers, -1) % 7
    model.deferral = 1
    hybrid = attach_hybrid(model, open_weights(gguf_q8), HybridConfig(policy=policy, budget=budget, counts=counts))
    recorder = WeightedRecorder(model.cfg.num_layers, model.cfg.num_experts_per_tok)
    model.add_route_observer(recorder)
    pending_at_next_layer = []
    engines = [moe.backends["cpu"].experts for moe in model.moe_blocks()]
    model.add_route_observer(lambda layer, ids, w: pending_at_next_layer.append(
        layer > 0 and engines[layer - 1].pending))
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=12))
    assert any(pending_at_next_layer)  # the previous layer's deferred experts still run on the pool
    ids, weights = recorder.trace()
    decode, decode_w = ids[len(PROMPT):], weights[len(PROMPT):]
    with_deferral = SimConfig(policy, budget, deferral=1, prefill_tokens=0)
    if not policy.startswith("static:"):
        sim = simulate(decode, model.cfg.num_experts, hybrid.cost, with_deferral, decode_w)
        assert sim.decode_ms_per_token == pytest.approx(1e3 / hybrid.stats.modeled_tok_s, rel=1e-9)
        exact = simulate(decode, model.cfg.num_experts, hybrid.cost, SimConfig(policy, budget, prefill_tokens=0),
                         decode_w)
        assert sim.decode_tok_s >= exact.decode_tok_s  # deferring takes CPU work off the critical path

    reference, _ = load_model(gguf_q8)
    reference.deferral = 1
    monkeypatch.setattr(MoEBlock, "forward", _masked_deferral_forward)
    ref_logits = reference.forward(torch.tensor(PROMPT), reference.new_cache(len(PROMPT)))
    monkeypatch.undo()
    logits = model.forward(torch.tensor(PROMPT), model.new_cache(len(PROMPT)))
    assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("policy,budget", [("lru+prefetch", 0.25), ("value+prefetch", 0.3)])
def test_live_prefetch_makes_the_simulators_decisions(gguf_q8, reference_tokens, policy, budget):
    """The live runtime prefetches the next layer's predicted experts (RouterLookahead on the hidden
    state) through the same Prefetcher and timeline as the simulator: replaying the routing and the
    predictions the run made gives the same hits, copies and modeled time; the tokens stay exact."""
    from ktlab.model.lookahead import PredictionRecorder, RouterLookahead

    model, _ = load_model(gguf_q8)
    cfg = model.cfg
    hybrid = attach_hybrid(model, open_weights(gguf_q8), HybridConfig(policy=policy, budget=budget))
    recorder = WeightedRecorder(cfg.num_layers, cfg.num_experts_per_tok)
    model.add_route_observer(recorder)
    predictions = PredictionRecorder(cfg.num_layers, 1, cfg.num_experts_per_tok)
    RouterLookahead(model, 1, predictions)
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    assert tokens == reference_tokens
    assert hybrid.prefetcher.copies > 0 and hybrid.prefetcher.useful > 0
    ids, weights = recorder.trace()
    predicted = predictions.predicted(len(ids))[len(PROMPT):, :, 0]
    decode, decode_w = ids[len(PROMPT):], weights[len(PROMPT):]
    sim = simulate(decode, cfg.num_experts, hybrid.cost, SimConfig(policy, budget, prefill_tokens=0), decode_w,
                   predicted)
    stats = hybrid.stats
    assert sim.hit_rate == pytest.approx(stats.hit_rate, abs=1e-12)
    assert sim.transfers_per_token * decode.shape[0] == pytest.approx(stats.copies)
    assert sim.decode_ms_per_token == pytest.approx(1e3 / stats.modeled_tok_s, rel=1e-9)
    on_demand = simulate(decode, cfg.num_experts, hybrid.cost, SimConfig(policy.split("+")[0], budget,
                                                                         prefill_tokens=0), decode_w)
    assert sim.hit_rate > on_demand.hit_rate  # copies made before the use serve it
