"""The engine with a prefix cache: outputs equal to the cache off, prefill skipped, pins released,
disk restart and corruption end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ktlab.model import load_model
from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig
from ktlab.serve.prefix import DiskTier, RamTier, TieredPrefixCache, model_fingerprint, scope_for

TIMEOUT = 120
GREEDY = SamplingConfig(max_tokens=8)
PAGE = 4


@pytest.fixture(scope="module")
def f64(gguf_f32):
    model, _ = load_model(gguf_f32, dtype=torch.float64, experts="torch")
    return model, model_fingerprint(gguf_f32)


def shared_prompts(vocab: int, n: int, prefix_len: int = 21, seed: int = 0) -> list[list[int]]:
    """n prompts: one shared prefix (a system prompt) + a different tail each."""
    rng = np.random.default_rng(seed)
    head = rng.integers(3, vocab, size=prefix_len).tolist()
    return [head + rng.integers(3, vocab, size=int(rng.integers(1, 9))).tolist() for _ in range(n)]


def make_engine(model, cache: TieredPrefixCache | None) -> Engine:
    config = EngineConfig(max_batch_size=8, max_tokens_in_batch=64, kv=KVConfig(page_size=PAGE, num_pages=128))
    return Engine(model, None, config, prefix_cache=cache).start()


def run(engine: Engine, prompts: list[list[int]], together: bool = False) -> list[tuple[list[int], int]]:
    """(tokens, cached_tokens) per prompt, one after another or all at once."""
    if together:
        handles = [engine.submit(p, GREEDY) for p in prompts]
        results = [h.result(TIMEOUT) for h in handles]
    else:
        results = [engine.submit(p, GREEDY).result(TIMEOUT) for p in prompts]
    return [(ids, event.stats.cached_tokens) for ids, _, event in results]


def ram_cache(model, model_id: str, pages: int = 1000) -> TieredPrefixCache:
    scope = scope_for(model, model_id, PAGE)
    page_bytes = 2 * model.cfg.num_layers * model.cfg.num_kv_heads * PAGE * model.cfg.head_dim * 8
    return TieredPrefixCache([RamTier(pages * page_bytes)], scope)


@pytest.fixture(scope="module")
def reference(f64):
    """Outputs with the cache off."""
    model, _ = f64
    prompts = shared_prompts(model.cfg.vocab_size, 6)
    engine = make_engine(model, None)
    try:
        return prompts, [ids for ids, _ in run(engine, prompts)]
    finally:
        engine.stop()


def test_cache_on_equals_cache_off_and_skips_prefill(f64, reference):
    model, model_id = f64
    prompts, expected = reference
    cache = ram_cache(model, model_id)
    engine = make_engine(model, cache)
    try:
        got = run(engine, prompts)
        again = run(engine, prompts)  # whole prompts (and replies) cached now
        metrics = engine.metrics()
    finally:
        engine.stop()
    assert [ids for ids, _ in got] == expected
    assert [ids for ids, _ in again] == expected
    assert got[0][1] == 0 and all(c == 20 for _, c in got[1:])  # 21 shared tokens: 5 whole pages
    for (_, c), p in zip(again, prompts, strict=True):
        assert c == (len(p) - 1) // PAGE * PAGE  # always one prompt token left to prefill
    assert metrics["prefix_saved_tokens"] == sum(c for _, c in got + again)
    assert metrics["prefix_hits_ram"] > 0 and metrics["prefix_bytes_ram"] > 0
    assert not cache.pins and metrics["kv_pages_used"] == 0  # pages freed when all users end


def test_many_requests_share_a_prefix_at_once(f64, reference):
    model, model_id = f64
    prompts, expected = reference
    cache = ram_cache(model, model_id)
    engine = make_engine(model, cache)
    try:
        warm = run(engine, prompts[:1])
        together = run(engine, prompts[1:], together=True)
        metrics = engine.metrics()
    finally:
        engine.stop()
    assert [warm[0][0]] + [ids for ids, _ in together] == expected
    assert all(c == 20 for _, c in together)
    assert not cache.pins and metrics["kv_pages_used"] == 0


def test_changed_token_breaks_the_match_from_its_page_on(f64):
    model, model_id = f64
    base = shared_prompts(model.cfg.vocab_size, 1, prefix_len=33)[0]
    cache = ram_cache(model, model_id)
    engine = make_engine(model, cache)
    off = make_engine(model, None)
    try:
        run(engine, [base])
        for pos in (0, 3, 4, 13, 30):
            changed = base.copy()
            changed[pos] = 3 if base[pos] != 3 else 4
            (ids, cached), = run(engine, [changed])
            assert cached == min(pos // PAGE * PAGE, (len(changed) - 1) // PAGE * PAGE)
            assert ids == run(off, [changed])[0][0]
    finally:
        engine.stop()
        off.stop()


def test_disk_restart_and_corruption_end_to_end(f64, reference, tmp_path, capsys):
    model, model_id = f64
    prompts, expected = reference
    scope = scope_for(model, model_id, PAGE)
    page_bytes = 2 * model.cfg.num_layers * model.cfg.num_kv_heads * PAGE * model.cfg.head_dim * 8

    def tiered() -> TieredPrefixCache:  # a RAM tier of 2 pages: most pages go down to disk
        return TieredPrefixCache([RamTier(2 * page_bytes), DiskTier(tmp_path, 10**8, scope)], scope)

    first = tiered()
    engine = make_engine(model, first)
    try:
        assert [ids for ids, _ in run(engine, prompts)] == expected
    finally:
        engine.stop()
    assert first.stats.demotions > 0 and len(first.tiers[1]) > 0
    # restart: a fresh cache over the same directory finds the disk pages
    engine = make_engine(model, tiered())
    try:
        got = run(engine, prompts[:1])
    finally:
        engine.stop()
    assert got[0][0] == expected[0] and got[0][1] == (len(prompts[0]) - 1) // PAGE * PAGE  # the whole prompt
    # corrupt every disk page: flip bytes in one, truncate another, the rest from another model
    files = sorted(tmp_path.glob("*" + DiskTier.SUFFIX))
    assert len(files) >= 3
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0x55
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:100])
    other = scope_for(model, "another-model", PAGE)
    for f in files[2:]:
        key = bytes.fromhex(f.name.removesuffix(DiskTier.SUFFIX))
        f.unlink()
        DiskTier(tmp_path / "other", 10**8, other).put(key, torch.zeros(other.page_shape, dtype=torch.float64))
        (tmp_path / "other" / f.name).rename(f)
    capsys.readouterr()
    cache = tiered()
    assert "discarded" in capsys.readouterr().err and len(cache.tiers[1]) == 0
    engine = make_engine(model, cache)
    try:
        assert [ids for ids, _ in run(engine, prompts)] == expected  # still correct, just not cached
    finally:
        engine.stop()


def test_scope_mismatch_refused(f64):
    model, model_id = f64
    cache = TieredPrefixCache([RamTier(10**6)], scope_for(model, model_id, PAGE * 2))
    with pytest.raises(ValueError, match="scope"):
        make_engine(model, cache)


def test_bench_prefix_modes(gguf_q8):
    from ktlab.serve.bench_prefix import PrefixBenchConfig, format_results, run_prefix_bench

    model, _ = load_model(gguf_q8)
    config = PrefixBenchConfig(shared_tokens=32, tail_tokens=4, requests=3, max_tokens=3, page_size=8)
    results = {r.mode: r for r in run_prefix_bench(config, model, gguf_q8)}
    assert list(results) == ["off", "ram", "ram+disk", "restart"]
    assert results["off"].cached_tokens == 0 and results["off"].prefilled_tokens == 3 * 36
    assert results["ram"].cached_tokens == 2 * 32 and results["restart"].cached_tokens == 3 * 32
    assert results["restart"].hits.get("disk", 0) > 0
    assert all(r.equal_to_off for r in results.values())
    assert "restart" in format_results(list(results.values()))
    with pytest.raises(ValueError):
        PrefixBenchConfig(requests=0)


def test_bench_prefix_multi_turn_and_few_shot(gguf_q8):
    """Multi-turn: every later turn finds the previous turn's prompt and reply in the cache (whole
    pages of it); few-shot: the header of shots is served from the cache after the first request."""
    from ktlab.serve.bench_prefix import PrefixBenchConfig, run_prefix_bench

    model, _ = load_model(gguf_q8)
    turns = PrefixBenchConfig(workload="multi-turn", shared_tokens=20, tail_tokens=6, requests=4, max_tokens=5,
                              page_size=8, modes=("off", "ram"))
    off, ram = run_prefix_bench(turns, model, gguf_q8)
    assert ram.equal_to_off and off.cached_tokens == 0
    # turn t's prompt: 20 + 6t + 5(t-1) tokens; the cache holds the whole pages of the previous
    # turn's prompt + reply, minus the last position (its logits are needed): (20 + 11(t-1) - 1) // 8 pages
    expected = sum(8 * ((20 + 11 * (t - 1) - 1) // 8) for t in range(2, 5))
    assert ram.cached_tokens == expected
    assert ram.prompt_tokens == off.prompt_tokens == sum(20 + 6 * t + 5 * (t - 1) for t in range(1, 5))
    shots = PrefixBenchConfig(workload="few-shot", shots=3, shared_tokens=16, tail_tokens=4, requests=3,
                              max_tokens=2, page_size=8, modes=("off", "ram"))
    off, ram = run_prefix_bench(shots, model, gguf_q8)
    assert ram.equal_to_off and ram.cached_tokens == 2 * 48 and off.prompt_tokens == 3 * 52
    assert ram.ttft_first > 0 and ram.ttft_rest > 0
    with pytest.raises(ValueError, match="modes"):
        PrefixBenchConfig(modes=("warm",))
