"""Hybrid CPU+GPU experts in batched serving: the engine's steps drive the expert cache and scheduler.

A simulated GPU computes its experts with the same C++ kernels, so greedy tokens must equal
all-CPU serving; the hybrid runtime's counts are checked against an independent route observer.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from test_serve_api import ROOT, START_TIMEOUT, free_port, start_server, stop_server
from test_serve_engine import prompts

from ktlab.model import load_model
from ktlab.runtime.generate import SamplingConfig
from ktlab.runtime.hybrid import HybridConfig, HybridPlacement, attach_hybrid
from ktlab.serve.api import prometheus
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig

TIMEOUT = 120
GREEDY = SamplingConfig(max_tokens=16, temperature=0.0)
REQUESTS = 6


class StepCounter:
    """Route observer counting what the hybrid runtime should count, on its own: tokens and
    (token, layer, slot) lookups per forward call, hits against the residency before the step
    (the cache only changes after a call's last layer), and the residency's per-layer size."""

    def __init__(self, hybrid: HybridPlacement) -> None:
        self.hybrid = hybrid
        self.calls = self.tokens = self.lookups = self.hits = 0
        self.over_capacity = 0

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        cache = self.hybrid.cache
        if layer == 0:
            self.calls += 1
            self.tokens += ids.shape[0]
            self.over_capacity += int(np.sum(cache.resident.sum(axis=1) > cache.capacity))
        self.lookups += ids.numel()
        self.hits += int(cache.resident[layer, ids.numpy()].sum())


def tiny_engine(hybrid: HybridConfig | None = None) -> Engine:
    """The bundled tiny model (6 layers, 64 experts, top-4) in an engine with small steps, so prompts
    are prefilled in chunks that share steps with other requests' decode tokens."""
    model, _ = load_model("tiny")
    return Engine(model, None, EngineConfig(max_batch_size=REQUESTS, max_tokens_in_batch=24,
                                            kv=KVConfig(page_size=8, num_pages=64), hybrid=hybrid))


def serve_all(engine: Engine, batch: list[list[int]]) -> list[list[int]]:
    """Submit every request before the loop starts (the same steps in every run), then serve them."""
    handles = [engine.submit(p, GREEDY) for p in batch]
    engine.start()
    try:
        return [h.result(TIMEOUT)[0] for h in handles]
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def batch() -> list[list[int]]:
    return prompts(REQUESTS, 4000, seed=3)  # 3 .. 40 tokens each (the tiny model's vocab is larger)


@pytest.fixture(scope="module")
def all_cpu_tokens(batch) -> list[list[int]]:
    return serve_all(tiny_engine(), batch)


@pytest.mark.parametrize("policy,budget", [("value", 0.15), ("lru", 0.10), ("static:frequency", 0.20)])
def test_batched_hybrid_serving_equals_all_cpu(batch, all_cpu_tokens, policy, budget):
    engine = tiny_engine(HybridConfig(accelerator="simulated:rtx4090-24g", policy=policy, budget=budget))
    hybrid = engine.hybrid
    assert hybrid is not None and hybrid.batched
    counter = StepCounter(hybrid)
    engine.model.add_route_observer(counter)
    initial = hybrid.cache.resident.copy()
    assert serve_all(engine, batch) == all_cpu_tokens

    stats, cfg = hybrid.stats, engine.model.cfg
    assert stats.steps == counter.calls == engine.steps  # one cache/scheduler step per engine step
    assert counter.tokens > engine.steps  # steps did batch several tokens
    assert stats.tokens == counter.tokens
    assert stats.lookups == counter.lookups == counter.tokens * cfg.num_layers * cfg.num_experts_per_tok
    assert stats.hits == counter.hits and 0 < stats.hits < stats.lookups
    assert counter.over_capacity == 0 and np.all(hybrid.cache.resident.sum(axis=1) <= hybrid.cache.capacity)
    assert stats.modeled_seconds > 0 and stats.modeled_tok_s == pytest.approx(stats.tokens / stats.modeled_seconds)
    assert "simulated rtx4090-24g" in stats.summary() and "batched steps" in stats.summary()
    if policy.startswith("static:"):
        assert stats.copies == 0 and np.array_equal(hybrid.cache.resident, initial)
    else:
        assert stats.copies > 0
    metrics = engine.metrics()
    assert metrics["hybrid_expert_lookups"] == stats.lookups and metrics["hybrid_steps"] == engine.steps
    assert metrics["hybrid_simulated"] == 1.0


def test_failed_step_is_dropped_and_serving_goes_on(batch):
    """A step that fails mid-model (here: in layer 2's experts) is not counted; layer 0 of the
    next step begins a fresh one, and the counts still match the steps that ran."""
    engine = tiny_engine(HybridConfig(policy="lru", budget=0.1))
    hybrid = engine.hybrid
    moe = engine.model.layers[2].moe
    failures = []

    class FailOnce:
        def __init__(self, inner) -> None:
            self.inner = inner

        def forward(self, *args):
            if not failures:
                failures.append(1)
                raise RuntimeError("injected expert failure")
            return self.inner.forward(*args)

    moe.backends = {name: FailOnce(backend) for name, backend in moe.backends.items()}
    failed = engine.submit(batch[0], GREEDY)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="injected expert failure"):
            failed.result(TIMEOUT)
        counter = StepCounter(hybrid)
        engine.model.add_route_observer(counter)
        steps_before = engine.steps
        ids = [h.result(TIMEOUT)[0] for h in [engine.submit(p, GREEDY) for p in batch[:3]]]
    finally:
        engine.stop()
    assert all(len(i) == GREEDY.max_tokens for i in ids)
    assert hybrid.stats.steps == engine.steps and counter.calls == engine.steps - steps_before
    assert hybrid.stats.lookups == counter.lookups  # nothing of the failed call was counted
    assert hybrid.stats.hits == counter.hits


def test_engine_adopts_a_hybrid_model_and_rejects_bad_configs():
    model, _ = load_model("tiny")
    hybrid = attach_hybrid(model, None, HybridConfig(policy="lru"))
    assert not hybrid.batched
    engine = Engine(model, None, EngineConfig(kv=KVConfig(page_size=8, num_pages=16)))
    assert engine.hybrid is hybrid and hybrid.batched  # the engine's steps are batched steps
    with pytest.raises(ValueError, match="already has a hybrid placement"):
        Engine(model, None, EngineConfig(kv=KVConfig(page_size=8, num_pages=16), hybrid=HybridConfig()))
    with pytest.raises(ValueError, match="EngineConfig.hybrid must be a HybridConfig"):
        EngineConfig(hybrid="simulated:rtx4090-24g")
    with pytest.raises(ValueError, match="unknown accelerator profile"):
        HybridConfig(accelerator="simulated:tpu-v9")
    with pytest.raises(RuntimeError, match="route observer"):
        HybridPlacement(hybrid.L, hybrid.E, hybrid.k, hybrid.cost, hybrid.cache, False,
                        hybrid.accelerator).locate(0, np.array([1, 2, 3, 4]))


def test_prometheus_names_every_modeled_number_simulated():
    model, _ = load_model("tiny")
    engine = Engine(model, None, EngineConfig(kv=KVConfig(page_size=8, num_pages=16),
                                              hybrid=HybridConfig(accelerator="simulated:h100-80g")))
    text = prometheus(engine.metrics(), "tiny", engine.hybrid.accelerator.label)
    hybrid = [line for line in text.splitlines() if "ktlab_hybrid" in line]
    assert any("ktlab_hybrid_expert_hit_rate" in line for line in hybrid)
    assert not any("modeled_" in line.split(" ")[0] for line in hybrid if not line.startswith("#"))
    for line in hybrid:
        if not line.startswith("# TYPE"):
            assert "simulated" in line, line  # name, help or label: every hybrid number says it
    samples = [line for line in hybrid if not line.startswith("#")]
    assert all('accelerator="simulated h100-80g"' in line for line in samples)
    assert "ktlab_hybrid" not in prometheus(Engine(load_model("tiny")[0], None, EngineConfig(
        kv=KVConfig(page_size=8, num_pages=16))).metrics(), "tiny")  # off: no hybrid lines


def hybrid_metrics(url: str) -> tuple[dict[str, float], list[str]]:
    lines = [line for line in httpx.get(url + "/metrics", timeout=5).text.splitlines() if "ktlab_hybrid" in line]
    values = {}
    for line in lines:
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values, lines


def test_serve_with_simulated_accelerator_reports_hybrid_metrics(gguf_q8):
    proc, url = start_server(gguf_q8, "--accelerator", "simulated:rtx4090-24g", "--policy", "lru",
                             "--budget", "50", "--max-tokens-in-batch", "16", api_key=None)
    statuses: list[int] = []
    try:
        def complete(prompt: list[int]) -> None:  # four at once: they share steps
            body = {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0}
            statuses.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=complete, args=(p,)) for p in prompts(4, 300, seed=5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        values, lines = hybrid_metrics(url)
    finally:
        stop_server(proc)
    assert statuses == [200] * 4
    log = proc.stdout.read()
    assert "hybrid experts on simulated rtx4090-24g, policy lru" in log
    assert "hybrid (simulated rtx4090-24g):" in log and "batched steps" in log  # the totals at shutdown
    assert all("simulated" in line for line in lines if not line.startswith("# TYPE"))
    L, k = 2, 2  # the test model (conftest)
    assert values["ktlab_hybrid_expert_lookups_total"] == values["ktlab_hybrid_tokens_total"] * L * k > 0
    assert 0 < values["ktlab_hybrid_expert_hit_rate"] <= 1 and values["ktlab_hybrid_expert_copies_total"] > 0
    assert values["ktlab_hybrid_simulated_tokens_per_second"] > 0
    assert values["ktlab_hybrid_simulated_seconds_total"] > 0 and values["ktlab_hybrid_simulated"] == 1


@pytest.mark.parametrize("flags,message", [
    (("--accelerator", "simulated:tpu-v9"), "unknown accelerator profile"),
    (("--accelerator", "simulated:rtx4090-24g", "--policy", "belady"), "needs the future"),
    (("--accelerator", "cuda"), "no CUDA GPU is visible"),
])
def test_serve_bad_hybrid_flags_are_one_line_errors(gguf_q8, flags, message):
    if flags[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    r = subprocess.run([sys.executable, "-m", "ktlab", "serve", "--model", str(gguf_q8), "--port", str(free_port()),
                        *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=START_TIMEOUT)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr



def test_cache_step_of_several_tokens():
    """A batched step looks up every (token, slot); an expert chosen by several tokens counts once,
    at its heaviest routing weight (here that keeps expert 1, whose other choice is the lightest)."""
    from ktlab.sched.cache import make_policy

    cache = make_policy("lru", 1, 4, 2)
    step = cache.step(np.array([[3, 1, 1, 2]]), np.array([[0.1, 0.9, 0.05, 0.5]]))
    assert step.hits.shape == (1, 4) and not step.hits.any()
    assert np.flatnonzero(cache.resident[0]).tolist() == [1, 2]
    step = cache.step(np.array([[1, 0, 2, 1]]))
    assert step.hits.tolist() == [[True, False, True, True]]
    assert cache.resident.sum() == 2
