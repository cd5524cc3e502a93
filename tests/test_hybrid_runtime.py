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
    model.deferral = 1
    with pytest.raises(ValueError, match="does not defer"):
        attach_hybrid(model, open_weights(gguf_q8), HybridConfig())


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
