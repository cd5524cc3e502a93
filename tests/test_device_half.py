"""The device half of hybrid inference: the dense part and the KV cache as plain torch on the
accelerator's device, resident experts there, the CPU experts overlapping them; the same tokens as on
the CPU, the VRAM budget kept, the cache's decisions equal to the simulator's.

CI runs it with the CPU as the device (``torch:cpu``); ``KTLAB_TEST_ACCELERATOR=cuda`` runs the same
tests on a GPU (``scripts/gpu_check.py`` does)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import nmse, our_logits

from ktlab.model import load_model, open_weights
from ktlab.model.layers import row_kernels_apply
from ktlab.runtime.generate import SamplingConfig, generate
from ktlab.runtime.hybrid import DeviceExperts, HybridConfig, attach_hybrid, dense_device
from ktlab.sched.simulate import SimConfig, simulate
from ktlab.sched.stats import WeightedRecorder

ACCELERATOR = os.environ.get("KTLAB_TEST_ACCELERATOR", "torch:cpu")
DEVICE = "cuda" if ACCELERATOR == "cuda" else "cpu"
PROMPT = [5, 17, 42, 99, 7, 64, 3, 150]  # ids valid in both vocabularies (test fixture, bundled tiny)
STEPS = 24
LOGITS_NMSE_DEVICE = 1e-2  # float32 torch dense part vs the Q8_0 block kernels (int8 activations; ~1.4e-3)


@pytest.fixture(scope="module")
def device_tokens():
    """Greedy tokens of the bundled (trained) tiny model with the dense part on the device and every
    expert on the CPU engine. Token equality is checked on the trained model: resident experts run in
    float torch, CPU ones on int8 activations, and a random-weight model's near-ties flip under that."""
    model, _ = load_model("tiny", device=DEVICE)
    return generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))[0]


def test_dense_part_on_the_device_is_plain_torch_and_gives_the_cpu_model(gguf_q8, monkeypatch):
    """device=: every dense weight a float tensor there (no block kernels), the KV cache there, plain
    torch inside a step; logits near the CPU kernels'."""
    cpu, _ = load_model(gguf_q8)
    dev, _ = load_model(gguf_q8, device=DEVICE)
    assert dev.device.type == DEVICE and dev.lm_head.qmat is None
    assert all(layer.attn.qkv is None and layer.attn.wq.qmat is None for layer in dev.layers)
    assert dev.device_dense_bytes() > dev.cfg.vocab_size * dev.cfg.hidden_size * 4  # embeddings and head at least
    assert cpu.device_dense_bytes() == 0
    seen = {}
    linear = type(dev.layers[0].attn.wq)
    original = linear.__call__

    def spy(self, x):
        seen.setdefault(self is dev.layers[0].attn.wq, []).append(row_kernels_apply(x))
        return original(self, x)

    monkeypatch.setattr(linear, "__call__", spy)
    assert nmse(our_logits(dev, PROMPT), our_logits(cpu, PROMPT)) < LOGITS_NMSE_DEVICE
    assert seen[True] == [False]  # inside a device step the C++ row kernels are off: the code a GPU runs
    assert any(seen[False])  # the CPU model's steps use them
    # (greedy tokens drift apart after ~17 steps on this random model: float32 vs int8 activations)


@pytest.mark.parametrize("policy,budget", [("lru", 0.25), ("value", 0.5)])
def test_torch_cpu_hybrid_gives_the_tokens_and_the_simulators_decisions(device_tokens, policy, budget):
    model, _ = load_model("tiny", device=dense_device(HybridConfig(accelerator=ACCELERATOR)))
    hybrid = attach_hybrid(model, open_weights("tiny"), HybridConfig(ACCELERATOR, policy, budget))
    recorder = WeightedRecorder(model.cfg.num_layers, model.cfg.num_experts_per_tok)
    model.add_route_observer(recorder)
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    assert tokens == device_tokens
    stats = hybrid.stats
    assert ACCELERATOR.split(":")[0] in stats.summary() and "simulated" not in stats.summary()
    assert 0 < stats.hit_rate < 1 and stats.copies > 0
    ids, weights = recorder.trace()
    decode, decode_w = ids[len(PROMPT):], weights[len(PROMPT):]
    sim = simulate(decode, model.cfg.num_experts, hybrid.cost, SimConfig(policy, budget, prefill_tokens=0), decode_w)
    assert sim.hit_rate == pytest.approx(stats.hit_rate, abs=1e-12)
    assert sim.transfers_per_token * decode.shape[0] == pytest.approx(stats.copies)
    gpu = [moe.backends["gpu"] for moe in model.moe_blocks()]
    assert all(isinstance(g, DeviceExperts) for g in gpu)
    hybrid.settle()  # the last step's admissions (they wait for the next call otherwise)
    for layer, g in enumerate(gpu):  # the device holds exactly the cache's experts after every step
        assert set(g.resident) == set(np.flatnonzero(hybrid.cache.resident[layer]).tolist())


def test_vram_budget_covers_dense_kv_and_experts_and_is_never_exceeded(gguf_q8):
    """--vram-budget on a real accelerator: the dense part and KV come first, the rest is expert slots;
    no layer ever holds more experts than its slots, even while fetching into a full layer."""
    model, _ = load_model(gguf_q8, device=DEVICE)
    cfg, kv = model.cfg, 1 << 20
    expert = cfg.expert_params * 4  # float32 on the device
    half = cfg.num_layers * cfg.num_experts // 2
    budget = model.device_dense_bytes() + kv + (half + 0.5) * expert
    hybrid = attach_hybrid(model, open_weights(gguf_q8), HybridConfig(ACCELERATOR, "lru", vram_budget_gb=budget / 1e9),
                           kv_bytes=kv)
    memory = hybrid.memory
    assert memory.dense == model.device_dense_bytes() and memory.kv == kv and memory.total <= budget
    slots = int(hybrid.cache.capacity.sum())
    assert slots == half and memory.experts == slots * expert
    assert "device memory" in hybrid.describe()
    generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    for layer, moe in enumerate(model.moe_blocks()):
        g = moe.backends["gpu"]
        assert g.peak_bytes <= hybrid.cache.capacity[layer] * expert
    too_small = HybridConfig(ACCELERATOR, "lru", vram_budget_gb=model.device_dense_bytes() / 2e9)
    with pytest.raises(ValueError, match="less than the dense part"):
        attach_hybrid(load_model(gguf_q8, device=DEVICE)[0], open_weights(gguf_q8), too_small)


def test_cpu_experts_run_while_the_device_computes_its_own(gguf_q8, monkeypatch):
    """A layer split between both submits the CPU share to the C++ pool first: the call is pending
    while the device's experts compute. (A static placement: with the CPU's own copy rate as "PCIe",
    the scheduler would rather fetch every miss.)"""
    model, _ = load_model(gguf_q8, device=DEVICE)
    attach_hybrid(model, open_weights(gguf_q8), HybridConfig(ACCELERATOR, "static:uniform", 0.5))
    pending = []
    original = DeviceExperts.forward

    def spy(self, x, ids, weights, experts):
        engines = [moe.backends["cpu"].experts for moe in model.moe_blocks()]
        pending.append(any(e.pending for e in engines))
        return original(self, x, ids, weights, experts)

    monkeypatch.setattr(DeviceExperts, "forward", spy)
    generate(model, PROMPT, SamplingConfig(max_tokens=8))
    assert pending and any(pending)


def test_torch_cpu_hybrid_with_deferral_gives_the_all_cpu_deferred_tokens():
    """Deferral on the device half: resident experts of deferred slots run on the device at once,
    the CPU's deferred share joins the next layer; the tokens equal the all-CPU model's with the
    same deferral (trained tiny model)."""
    reference, _ = load_model("tiny", device=DEVICE)
    reference.deferral = 1
    expected, _ = generate(reference, PROMPT, SamplingConfig(max_tokens=STEPS))
    model, _ = load_model("tiny", device=DEVICE)
    model.deferral = 1
    hybrid = attach_hybrid(model, open_weights("tiny"), HybridConfig(ACCELERATOR, "lru", 0.25))
    tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    assert tokens == expected
    assert 0 < hybrid.stats.hit_rate < 1


def test_torch_cpu_prefetch_keeps_the_tokens_and_the_budget(device_tokens):
    """Prefetched experts are copied to the device while the previous layer computes (on CUDA on the
    copy stream): tokens equal, the device never holds more than each layer's slots, and what it holds
    after a step is the cache's set."""
    model, _ = load_model("tiny", device=DEVICE)
    hybrid = attach_hybrid(model, open_weights("tiny"), HybridConfig(ACCELERATOR, "value+prefetch", 0.25))
    loads = []
    original = DeviceExperts.load

    def spy(self, expert, keep=frozenset()):
        loads.append(expert)
        return original(self, expert, keep)

    DeviceExperts.load = spy
    try:
        tokens, _ = generate(model, PROMPT, SamplingConfig(max_tokens=STEPS))
    finally:
        DeviceExperts.load = original
    assert tokens == device_tokens
    assert hybrid.prefetcher.copies > 0 and loads
    hybrid.settle()
    one = hybrid.memory.experts // int(hybrid.cache.capacity.sum())  # one expert on the device
    for layer, moe in enumerate(model.moe_blocks()):
        g = moe.backends["gpu"]
        assert len(g.resident) <= hybrid.cache.capacity[layer] and g.peak_bytes <= hybrid.cache.capacity[layer] * one
        assert set(g.resident) == set(np.flatnonzero(hybrid.cache.resident[layer]).tolist())


def test_a_real_accelerator_needs_the_dense_part_there(gguf_q8):
    model, _ = load_model(gguf_q8)
    with pytest.raises(ValueError, match=f"load it with device='{DEVICE}'"):
        attach_hybrid(model, open_weights(gguf_q8), HybridConfig(ACCELERATOR))
    assert dense_device(HybridConfig()) is None  # a simulated accelerator leaves the model on the CPU


def test_generate_cli_on_torch_cpu(gguf_q8, capsys):
    from ktlab.cli import main

    assert main(["generate", "--model", str(gguf_q8), "--prompt", "def main", "--max-tokens", "6",
                 "--accelerator", ACCELERATOR, "--budget", "25"]) == 0
    err = capsys.readouterr().err
    assert "hybrid (torch:cpu (the CPU as the device))" in err and "simulated" not in err
    assert main(["generate", "--model", str(gguf_q8), "--prompt", "def main", "--max-tokens", "4",
                 "--accelerator", ACCELERATOR, "--deferral", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(gguf_q8), "--prompt", "x", "--deferral", "9"]) == 2
    assert "--deferral must be in [0, 1]" in capsys.readouterr().err


NEAR_TIE = 0.1  # logits: float torch vs int8-activation experts differ by a few hundredths


def assert_equal_but_at_a_near_tie(model, prompt: list[int], ref: list[int], got: list[int]) -> None:
    """``got`` equals the greedy ``ref`` up to its first difference, where ``ref``'s model (all experts
    on the CPU) had its two best logits within NEAR_TIE and ``got`` took the runner-up."""
    import torch

    j = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), None)
    if j is None:
        return
    ids = list(prompt) + ref[:j]
    logits = model.forward(torch.tensor(ids), model.new_cache(len(ids)), last_only=True)[0].float().cpu()
    top = torch.topk(logits, 2)
    assert top.indices.tolist() == [ref[j], got[j]], (j, top, ref[j], got[j])
    assert float(top.values[0] - top.values[1]) < NEAR_TIE, (j, top)


def test_batched_serving_on_torch_cpu_gives_each_sequence_its_all_cpu_tokens():
    """The serving engine on a torch:cpu hybrid: the KV pool on the device (counted in its memory),
    batched greedy completions equal those of the same device model with every expert on the CPU.
    Resident experts run in float torch, CPU ones on int8 activations: where the reference's two best
    logits are within NEAR_TIE a sequence may take the runner-up, and only there."""
    from test_serve_engine import prompts
    from test_serve_hybrid import REQUESTS, serve_all

    from ktlab.serve.engine import Engine, EngineConfig
    from ktlab.serve.kv import KVConfig

    def engine(hybrid: HybridConfig | None) -> Engine:
        model, _ = load_model("tiny", device=DEVICE)
        return Engine(model, None, EngineConfig(max_batch_size=REQUESTS, max_tokens_in_batch=24,
                                                kv=KVConfig(page_size=8, num_pages=64), hybrid=hybrid),
                      weights=open_weights("tiny"))

    batch = prompts(REQUESTS, 4000, seed=3)
    reference = serve_all(engine(None), batch)
    hybrid_engine = engine(HybridConfig(ACCELERATOR, "lru", 0.2))
    served = serve_all(hybrid_engine, batch)
    model, _ = load_model("tiny", device=DEVICE)
    for prompt, ref, got in zip(batch, reference, served, strict=True):
        assert_equal_but_at_a_near_tie(model, prompt, ref, got)
    hybrid = hybrid_engine.hybrid
    assert hybrid.memory.kv == hybrid_engine.kv.nbytes > 0
    assert hybrid.stats.batched and hybrid.stats.steps == hybrid_engine.steps and hybrid.stats.copies > 0
