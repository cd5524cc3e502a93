"""The continuous batching engine: batched forward == single forward, batched == alone, faults."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ktlab.model import BUNDLED, load_model
from ktlab.model.layers import SeqSlice
from ktlab.runtime.generate import SamplingConfig, generate
from ktlab.runtime.hybrid import HybridConfig
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig

TIMEOUT = 120  # seconds any one request may take in these tests
GREEDY = SamplingConfig(max_tokens=24)


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of different lengths (3 .. 40 tokens), so prefill chunks and decodes mix."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(3, 41))).tolist() for _ in range(n)]


def run_concurrently(engine: Engine, batch: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    handles = [engine.submit(p, sampling) for p in batch]
    return [h.result(TIMEOUT)[0] for h in handles]


def run_alone(engine: Engine, batch: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    return [engine.submit(p, sampling).result(TIMEOUT)[0] for p in batch]


@pytest.fixture(scope="module")
def q8_model(gguf_q8):
    return load_model(gguf_q8)


@pytest.fixture(scope="module")
def q8_long_model(gguf_q8_long):
    """The Q8_0 test model with an 8192-position context: requests that outlast the test's own
    checks on a host of any speed (a token takes well under a millisecond on a fast one)."""
    return load_model(gguf_q8_long)


@pytest.fixture(scope="module")
def q4km_model(gguf_q4km):
    return load_model(gguf_q4km)


@pytest.fixture(scope="module")
def f64_model(gguf_f32):
    return load_model(gguf_f32, dtype=torch.float64, experts="torch")


def test_forward_batch_matches_forward(f64_model):
    """Four sequences at different offsets, pages in any order, calls mixing prefill chunks and
    one-token (decode) steps == each sequence through Model.forward."""
    model, _ = f64_model
    seqs = prompts(4, model.cfg.vocab_size, seed=1)
    kv = model.new_paged_kv(num_pages=48, page_size=4)
    tables = [tuple(range(0, 11)), tuple(range(11, 22)), tuple(range(47, 36, -1)), tuple(range(22, 33))]
    done = [0, 0, 0, 0]
    # (sequence, tokens) per call: prefill chunks, then decode steps mixed with the last chunk
    calls = [[(0, 3), (1, 5), (2, 3)], [(0, 1), (1, 1), (3, 7)], [(0, 1), (2, 1), (3, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 1)], [(2, 2), (0, 1)]]
    for call in calls:
        slices = [SeqSlice(tables[i], done[i], n) for i, n in call]
        tokens = torch.tensor([t for i, n in call for t in seqs[i][done[i] : done[i] + n]])
        got = model.forward_batch(tokens, slices, kv)
        for row, (i, n) in enumerate(call):
            done[i] += n
            ref = model.forward(torch.tensor(seqs[i][: done[i]]), model.new_cache(done[i]), last_only=True)[0]
            np.testing.assert_allclose(got[row].numpy(), ref.numpy(), rtol=0, atol=1e-6)  # float32 logits


def batched_and_alone(model):
    """(prompts, outputs of 8 concurrent greedy requests, outputs of each served alone, engine)."""
    batch = prompts(8, model.cfg.vocab_size)
    engine = Engine(model, None, EngineConfig(max_batch_size=8, max_tokens_in_batch=48,
                                              kv=KVConfig(page_size=8, num_pages=64))).start()
    try:
        together = run_concurrently(engine, batch, GREEDY)
        alone = run_alone(engine, batch, GREEDY)
    finally:
        engine.stop()
    return batch, together, alone, engine


def test_batched_equals_alone_exact_float64(f64_model):
    """8 concurrent greedy requests == each served alone == generate(); float64 so summation order
    (which differs between batch shapes) cannot flip a token: this checks the batching logic."""
    model, _ = f64_model
    batch, together, alone, engine = batched_and_alone(model)
    assert together == alone
    assert alone[0] == generate(model, batch[0], GREEDY)[0]
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("which", ["q8_model", "q4km_model"])
def test_batched_equals_alone_cpu_experts(which, request):
    """The serving path (Q8_0 and the Q4_K_M mix, C++ experts, float32): 8 concurrent == each alone.

    A token's decode computation is batch-independent bit for bit (dense Q8_0 matmuls, routers
    and attention in kernels whose rows never depend on the batch; the C++ MoE is per-token
    exact); only prefill chunks' torch attention follows the chunking. Once a float GEMM whose
    kernel BLAS picks by row count sat in the dense path, 7 of 8 requests diverged here.
    """
    _, together, alone, _ = batched_and_alone(request.getfixturevalue(which)[0])
    assert together == alone


@pytest.mark.parametrize("which", ["q8_model", "q4km_model"])
def test_decode_logits_bit_identical_alone_and_batched(which, request):
    """Each sequence's decode-step logits are the same bits alone and in a batch of five (Q8_0, and
    the Q4_K_M mix of Q4_K, Q5_K, Q6_K and Q8_0 matrices)."""
    model = request.getfixturevalue(which)[0]
    kv = model.new_paged_kv(64, 8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, size=n).tolist() for n in (13, 30, 7, 21, 9)]
    tables = [tuple(range(8 * i, 8 * i + 8)) for i in range(5)]
    for prompt, table in zip(prompts, tables, strict=True):
        model.forward_batch(torch.tensor(prompt), [SeqSlice(table, 0, len(prompt))], kv)
    tokens = [3, 99, 100, 42, 7]
    seqs = [SeqSlice(tables[i], len(prompts[i]), 1) for i in range(5)]
    alone = [model.forward_batch(torch.tensor([tokens[i]]), [seqs[i]], kv)[0] for i in range(5)]
    together = model.forward_batch(torch.tensor(tokens), seqs, kv)
    for i in range(5):
        torch.testing.assert_close(together[i], alone[i], rtol=0, atol=0)


@pytest.mark.parametrize("which", ["q8_model", "q4km_model"])
def test_fused_decode_paths_give_the_bits_of_the_step_by_step_path(which, request, monkeypatch):
    """Three ways to run the same decode steps give equal logits, keys/values written and routing
    shown to the route observers: the whole step as one C++ call (DecodeModel), each layer's
    attention half as one call (decode_attention_block) with its experts added in one more
    (CpuExperts.forward_add), and the kernels called one by one from Python."""
    from ktlab.kernels import CpuExperts, DecodeModel
    from ktlab.model.moe_decoder import DecoderLayer

    model = request.getfixturevalue(which)[0]
    calls = {"step": 0, "block": 0, "add": 0}

    def counted(name, run):
        def wrapper(self, *a):
            calls[name] += 1
            return run(self, *a)
        return wrapper

    monkeypatch.setattr(DecodeModel, "step", counted("step", DecodeModel.step))
    monkeypatch.setattr(DecoderLayer, "_fused_decode_attention", counted("block", DecoderLayer._fused_decode_attention))
    monkeypatch.setattr(CpuExperts, "forward_add", counted("add", CpuExperts.forward_add))

    def decode(path: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list]:
        monkeypatch.setattr(model, "fused_decode_step", path == "step")
        if path == "plain":
            monkeypatch.setattr(DecoderLayer, "_fused_decode_applies", lambda self, x, kv, batch: False)
        for name in calls:
            calls[name] = 0
        kv = model.new_paged_kv(40, 8)
        prompts = [[5, 17, 42, 99, 7], [3, 250, 61], [13, 8, 21, 34, 55, 89, 144]]
        tables = [tuple(range(8 * i, 8 * i + 8)) for i in range(3)]
        seqs = [SeqSlice(tables[i], 0, len(p)) for i, p in enumerate(prompts)]
        tokens = model.forward_batch(torch.tensor(sum(prompts, [])), seqs, kv).argmax(-1)
        routed: list = []
        observer = lambda layer, ids, w: routed.append((layer, ids.clone(), w.clone()))  # noqa: E731
        model.add_route_observer(observer)
        steps = []
        try:
            for step in range(4):
                seqs = [SeqSlice(tables[i], len(p) + step, 1) for i, p in enumerate(prompts)]
                logits = model.forward_batch(tokens, seqs, kv)
                steps.append(logits)
                tokens = logits.argmax(-1)
        finally:
            model.remove_route_observer(observer)
        return steps, kv.k.clone(), kv.v.clone(), routed

    L = model.cfg.num_layers
    whole = decode("step")
    assert calls == {"step": 4, "block": 0, "add": 0}  # every decode step in one call
    per_layer = decode("layers")
    assert calls == {"step": 0, "block": 4 * L, "add": 4 * L}
    plain = decode("plain")
    assert calls == {"step": 0, "block": 0, "add": 0}
    for other in (per_layer, plain):
        for a, b in zip(whole[0], other[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(whole[1], other[1], rtol=0, atol=0)
        torch.testing.assert_close(whole[2], other[2], rtol=0, atol=0)
        assert len(whole[3]) == len(other[3]) == 4 * L
        for (la, ia, wa), (lb, ib, wb) in zip(whole[3], other[3], strict=True):
            assert la == lb and torch.equal(ia, ib) and torch.equal(wa, wb)


def test_metrics_count_the_weight_bytes_of_decode_steps(q8_model, monkeypatch):
    """decode_step_bytes = sum over decode-shaped calls (one token per sequence) of the dense
    bytes + expert bytes x distinct experts chosen per layer, counted here independently."""
    model, _ = q8_model
    calls: list[tuple[bool, int]] = []  # (decode-shaped, distinct experts over the layers)
    forward_batch = model.forward_batch

    def watched(tokens, seqs, kv, threads=None):
        distinct: list[int] = []
        observer = lambda layer, ids, w: distinct.append(len(np.unique(ids.numpy())))  # noqa: E731
        model.add_route_observer(observer)
        try:
            return forward_batch(tokens, seqs, kv, threads)
        finally:
            model.remove_route_observer(observer)
            calls.append((all(s.n_tokens == 1 for s in seqs), sum(distinct)))

    monkeypatch.setattr(model, "forward_batch", watched)
    engine = make_engine(model, bandwidth_gbs=20.0)
    try:
        handles = [engine.submit([5 + i, 9, 11, 40 + i], SamplingConfig(max_tokens=6), ignore_eos=True)
                   for i in range(3)]
        for h in handles:
            h.result(TIMEOUT)
    finally:
        engine.stop()  # the loop counts a step after its tokens are sent: stop, then read
    m = engine.metrics()
    decode = [n for shaped, n in calls if shaped]
    assert m["decode_steps"] == len(decode) >= 5
    assert m["decode_step_bytes"] == sum(model.dense_weight_bytes() + model.expert_bytes() * n for n in decode)
    ideal = m["decode_step_tokens"] / (m["decode_step_bytes"] / 20e9)
    assert m["decode_ideal_tokens_per_second"] == pytest.approx(ideal)
    assert 0 < m["decode_share_of_ideal"] == pytest.approx(m["decode_tokens_per_second"] / ideal)


def test_decode_roofline_takes_each_step_at_the_bandwidth_of_its_moment():
    from ktlab.serve.roofline import DecodeRoofline

    now = [0.0]
    samples = iter([30.0, 50.0, 20.0, 20.0, 20.0])
    roofline = DecodeRoofline(10.0, probe=lambda: next(samples), interval=0.5, window=3, clock=lambda: now[0])
    roofline.add_step(10**9)  # 0 s: no sample due, at the starting figure
    assert roofline.ideal_seconds == pytest.approx(0.1) and roofline.samples == 0
    now[0] = 0.6
    roofline.add_step(10**9)  # a sample (30 GB/s): the steps since the last one at the best of the window
    assert roofline.ideal_seconds == pytest.approx(2e9 / 30e9) and roofline.bandwidth_gbs == 30
    now[0] = 0.8
    roofline.add_step(3 * 10**9)  # not due: pending at the current figure
    assert roofline.ideal_seconds == pytest.approx(2e9 / 30e9 + 3e9 / 30e9)
    now[0] = 1.2
    roofline.add_step(10**9)  # 50 GB/s: the 4 GB since the last sample at 50
    assert roofline.ideal_seconds == pytest.approx(2e9 / 30e9 + 4e9 / 50e9) and roofline.samples == 2
    for t in (1.8, 2.4):  # two low samples (a preempted probe reads low): 50 stays in the window of 3
        now[0] = t
        roofline.add_step(0)
    assert roofline.bandwidth_gbs == 50
    now[0] = 3.0
    roofline.add_step(0)  # the 50 has left the window
    assert roofline.bandwidth_gbs == 20
    fixed = DecodeRoofline(25.0)
    fixed.add_step(5 * 10**9)
    assert fixed.ideal_seconds == pytest.approx(0.2)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        DecodeRoofline(0.0)


def test_decode_roofline_probes_at_most_its_duty_of_the_time():
    from ktlab.serve.roofline import DecodeRoofline

    now = [0.0]

    def slow_probe() -> float:  # a probe on a busy machine: 20 ms
        now[0] += 0.02
        return 30.0

    roofline = DecodeRoofline(10.0, probe=slow_probe, interval=0.5, clock=lambda: now[0], max_duty=0.01)
    for t in (0.6, 1.2, 2.0, 2.7):
        now[0] = t
        roofline.add_step(10**9)
    assert roofline.samples == 2  # at 0.6 and 2.7 s: after a 20 ms probe the next waits 2 s, not 0.5
    with pytest.raises(ValueError, match="duty"):
        DecodeRoofline(10.0, probe=slow_probe, max_duty=0)


def test_read_probe_measures_a_plausible_bandwidth():
    from ktlab.benchmarks.machine import ReadProbe

    probe = ReadProbe(16 << 20)
    assert 0.1 < probe() < 10_000
    with pytest.raises(ValueError, match="at least 1 MiB"):
        ReadProbe(1000)


def test_tracked_bandwidth_metrics_are_consistent(q8_model):
    with pytest.raises(ValueError, match="needs a starting bandwidth_gbs"):
        EngineConfig(track_bandwidth=True)
    m = metrics_after_two_requests(q8_model[0], bandwidth_gbs=20.0, track_bandwidth=True)
    assert m["decode_steps"] >= 3 and m["bandwidth_samples"] >= 0
    assert m["bandwidth_gbs"] == pytest.approx(m["decode_step_bytes"] / m["decode_step_ideal_seconds"] / 1e9)
    assert m["decode_share_of_ideal"] == pytest.approx(m["decode_step_ideal_seconds"] / m["decode_step_seconds"])


def test_read_regions_reads_every_byte():
    from ktlab import _kernels
    from ktlab.kernels import read_regions

    data = np.random.default_rng(0).integers(0, 256, size=5 << 20, dtype=np.uint8)
    whole, _ = _kernels.read_sum(data, 2)
    parts = [data[: 3 << 20], data[3 << 20 : (3 << 20) + 4096], data[(3 << 20) + 4096 :]]  # 64-byte multiples
    total, seconds = _kernels.read_regions(parts, 2)
    assert total == whole and seconds > 0  # uint64 word sums, so any split of the words gives the same sum
    assert read_regions(parts) > 0 and read_regions([]) == 0.0


def test_weight_regions_are_the_bytes_a_step_counts(q8_model):
    """The regions paired reads re-read hold exactly the bytes StepBytes counts for the step."""
    from ktlab.serve.roofline import StepBytes

    model = q8_model[0]
    step_bytes = StepBytes(model)
    try:
        kv = model.new_paged_kv(8, 8)
        model.forward_batch(torch.tensor([5, 9]), [SeqSlice((0, 1), 0, 1), SeqSlice((2, 3), 0, 1)], kv)
        counted = step_bytes.take()
        regions = model.weight_regions(step_bytes.last_selected)
        assert sum(r.nbytes for r in regions) == counted
        assert all(r.dtype == np.uint8 and r.ndim == 1 and r.flags.c_contiguous for r in regions)
    finally:
        model.remove_route_observer(step_bytes)


def test_paired_reads_sample_steps_within_their_duty():
    from ktlab.serve.roofline import PairedReads

    class Model:  # what PairedReads needs of a model: its MoE layer count and weight regions
        class cfg:
            num_moe_layers = 2

        def weight_regions(self, selected):
            return [np.zeros(64, np.uint8)]

    now = [0.0]
    paired = PairedReads(Model(), interval=0.5, max_duty=0.05, clock=lambda: now[0])

    def read(regions):  # a read of 40 ms: the next waits 0.8 s, not 0.5
        now[0] += 0.04
        return 0.04

    paired._read = read
    for t in (0.0, 0.3, 0.6, 0.9, 1.0):
        now[0] = t
        paired.after_step([], 8, 0.05)
    m = paired.metrics()
    assert m["decode_paired_steps"] == 2 and m["decode_paired_tokens"] == 16  # at 0 (the first) and 0.9 s
    assert m["decode_paired_share"] == pytest.approx(0.08 / 0.10)
    with pytest.raises(ValueError, match="max_duty"):
        PairedReads(Model(), max_duty=0)


def test_engine_paired_reads_metrics(q8_model):
    m = metrics_after_two_requests(q8_model[0], paired_reads=True)
    assert m["decode_paired_steps"] >= 1 and m["decode_paired_read_seconds"] > 0  # the first decode step
    assert m["decode_paired_share"] == pytest.approx(m["decode_paired_read_seconds"] / m["decode_paired_step_seconds"])
    with pytest.raises(ValueError, match="every expert on the CPU"):
        Engine(q8_model[0], None, EngineConfig(paired_reads=True, hybrid=HybridConfig()))


def metrics_after_two_requests(model, **config) -> dict[str, float]:
    """An engine's metrics after two 5-token requests (3-token prompts), the engine stopped."""
    engine = make_engine(model, **config)
    try:
        for h in [engine.submit([5 + i, 9, 11], SamplingConfig(max_tokens=5), ignore_eos=True) for i in range(2)]:
            h.result(TIMEOUT)
    finally:
        engine.stop()
    return engine.metrics()


def make_engine(model, tok=None, **kw) -> Engine:
    kv = kw.pop("kv", KVConfig(page_size=8, num_pages=64))
    return Engine(model, tok, EngineConfig(kv=kv, **kw)).start()


def test_cancel_frees_pages_and_engine_keeps_serving(q8_long_model):
    model, tok = q8_long_model
    engine = make_engine(model, tok, max_batch_size=4, max_tokens_in_batch=64,
                         kv=KVConfig(page_size=16, num_pages=256))
    try:
        long = engine.submit([5, 6, 7], SamplingConfig(max_tokens=4000), ignore_eos=True)
        events = long.events(TIMEOUT)
        next(events)
        assert engine.blocks.num_used > 0
        long.cancel()
        final = [e for e in events][-1]
        assert final.kind == "done" and final.finish_reason == "cancelled"
        assert engine.blocks.num_used == 0
        ids, _, done = engine.submit([5, 6, 7], SamplingConfig(max_tokens=5)).result(TIMEOUT)
        assert len(ids) == 5 and done.finish_reason == "length" and done.stats.completion_tokens == 5
    finally:
        engine.stop()


def test_request_waits_while_pool_is_full_then_completes(q8_long_model):
    model, tok = q8_long_model
    engine = make_engine(model, tok, max_batch_size=4, max_tokens_in_batch=64,
                         kv=KVConfig(page_size=16, num_pages=126))
    try:  # 2010 positions: 126 pages, the whole pool
        first = engine.submit([5] * 10, SamplingConfig(max_tokens=2000), ignore_eos=True)
        second = engine.submit([6] * 4, SamplingConfig(max_tokens=4))
        deadline = time.monotonic() + TIMEOUT
        while engine.metrics()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics()["kv_pages_used"] == 126 and engine.metrics()["queue_length"] == 1
        assert len(first.result(TIMEOUT)[0]) == 2000
        assert len(second.result(TIMEOUT)[0]) == 4
        assert engine.blocks.num_used == 0
    finally:
        engine.stop()


def test_refuses_what_can_never_run(q8_model):
    model, tok = q8_model
    engine = Engine(model, tok, EngineConfig(kv=KVConfig(page_size=8, num_pages=4)))  # 32 positions
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * model.cfg.context_length, SamplingConfig(max_tokens=1))
    with pytest.raises(ValueError, match="KV pool"):
        engine.submit([1] * 30, SamplingConfig(max_tokens=3))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingConfig(max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([1], SamplingConfig(max_tokens=0))


def test_stop_strings_and_seeded_sampling(q8_model):
    model, tok = q8_model
    engine = make_engine(model, tok)
    try:
        sampling = SamplingConfig(max_tokens=40, temperature=0.9, top_p=0.9, top_k=50, seed=7)
        ids_a, text_a, _ = engine.submit([5, 17, 42], sampling).result(TIMEOUT)
        ids_b, text_b, _ = engine.submit([5, 17, 42], sampling).result(TIMEOUT)
        assert ids_a == ids_b and text_a == text_b  # same seed, same tokens (batched or not)
        full_ids, full, _ = engine.submit([5, 17, 42], GREEDY).result(TIMEOUT)
        assert len(full) > 4
        stop = full[2:4]
        ids, text, done = engine.submit([5, 17, 42], SamplingConfig(max_tokens=24), stop=[stop]).result(TIMEOUT)
        assert done.finish_reason == "stop" and text == full[: full.index(stop)] and stop not in text
    finally:
        engine.stop()


def test_load_32_requests_16_concurrent(q8_model):
    model, tok = q8_model
    engine = make_engine(model, tok, max_batch_size=16, max_tokens_in_batch=128, kv=KVConfig(page_size=8, num_pages=96))
    results: dict[int, int] = {}
    batch = prompts(32, model.cfg.vocab_size, seed=3)

    def client(i: int) -> None:
        for j in range(i, 32, 16):
            ids, _, done = engine.submit(batch[j], SamplingConfig(max_tokens=8 + j % 5)).result(TIMEOUT)
            results[j] = len(ids) if done.finish_reason in ("length", "stop") else -1

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert sorted(results) == list(range(32))
        assert all(0 < n <= 8 + j % 5 for j, n in results.items())
        assert engine.blocks.num_used == 0 and engine.metrics()["running"] == 0
    finally:
        engine.stop()


@pytest.mark.skipif(not BUNDLED["tiny"].exists(), reason="the bundled tiny model is not built")
def test_batched_equals_alone_bundled_tiny_model():
    """The trained model (real near-ties, longer prompts through several prefill chunks): 8 concurrent
    chat requests give exactly the greedy tokens each gives alone."""
    model, tok = load_model("tiny")
    questions = ["What is a decorator?", "Explain list comprehensions.", "How does pathlib work?",
                 "What is a generator?", "Describe the with statement.", "What does asyncio do?",
                 "How are exceptions raised?", "What is a dictionary?"]
    batch = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q * 6}])) for q in questions]
    sampling = SamplingConfig(max_tokens=32)
    engine = make_engine(model, tok, max_batch_size=8, max_tokens_in_batch=96, kv=KVConfig(page_size=16, num_pages=128))
    try:
        together = run_concurrently(engine, batch, sampling)
        alone = run_alone(engine, batch, sampling)
    finally:
        engine.stop()
    assert together == alone
    assert sum(len(t) for t in together) > 8 * 4  # real answers, not all EOS at once


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(q8_model, monkeypatch, capsys):
    model, tok = q8_model
    engine = make_engine(model, tok)
    real = model.forward_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward_batch", flaky)
    try:
        with pytest.raises(RuntimeError, match="internal error: boom"):
            engine.submit([5, 6, 7], SamplingConfig(max_tokens=4)).result(TIMEOUT)
        assert engine.blocks.num_used == 0
        assert len(engine.submit([5, 6, 7], SamplingConfig(max_tokens=4)).result(TIMEOUT)[0]) == 4
    finally:
        engine.stop()
    assert "step failed: RuntimeError: boom" in capsys.readouterr().err


def test_incremental_text_equals_one_decode_of_the_whole_output():
    """The streamed pieces (each token decodes a short window, never the whole output) join to
    exactly the tokenizer's decode of all the tokens, multi-byte characters included."""
    from ktlab.model import open_weights
    from ktlab.serve.engine import _Text

    tok = open_weights("tiny").tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(10):
        ids = rng.integers(0, 4096, size=300).tolist()
        text = _Text(tok, [])
        pieces = "".join(text.push(i)[0] for i in ids) + text.flush()
        whole = tok.decode([i for i in ids if i not in tok.special_ids])
        assert pieces == whole.removesuffix("\ufffd")  # a cut-off UTF-8 tail is never sent


def test_whole_decode_step_refuses_bad_inputs_with_clear_errors(q8_model):
    """DecodeModel.step checks the pool, slots and output shapes before any work."""
    model = q8_model[0]
    decode = model._whole_decode_model()
    assert decode is not None
    cfg = model.cfg
    kv = model.new_paged_kv(8, 8)
    L, nkv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    x = model.embed[torch.tensor([5, 6])].numpy()
    cos, sin = (t.numpy() for t in model.rope.at(torch.tensor([0, 0])))
    pools = kv.k.view(L, nkv, -1, hd).numpy(), kv.v.view(L, nkv, -1, hd).numpy()
    tables, lens = np.array([[0], [1]], dtype=np.int32), np.array([1, 1], dtype=np.int32)
    logits, ids, _ = decode.step(x, cos, sin, *pools, np.array([0, 8]), tables, lens, 8)
    assert logits.shape == (2, cfg.vocab_size) and ids.shape == (L, 2, cfg.num_experts_per_tok)
    with pytest.raises(ValueError, match="outside the pool"):
        decode.step(x, cos, sin, *pools, np.array([0, 64]), tables, lens, 8)
    with pytest.raises(ValueError, match="k_pools and v_pools"):
        decode.step(x, cos, sin, pools[0], np.ascontiguousarray(pools[1][:, :1]), np.array([0, 8]), tables, lens, 8)
    with pytest.raises(ValueError, match="one row per sequence"):
        decode.step(x, cos[:1], sin[:1], *pools, np.array([0, 8]), tables, lens, 8)


def test_decode_batch_index_tensors_equal_the_general_builder():
    """PagedBatch's decode-step builder gives the tensors of the general one (positions, write
    slots, rope rows, page tables and lengths), and refuses a table too short the same way."""
    from ktlab.model.layers import PagedBatch, Rope

    rope, rng = Rope(16, 10000.0), np.random.default_rng(3)
    for n_seqs in (1, 3, 16):
        for _ in range(20):
            seqs = []
            for _ in range(n_seqs):
                start = int(rng.integers(0, 200))
                table = tuple(int(p) for p in rng.permutation(100)[: start // 8 + 1 + int(rng.integers(0, 3))])
                seqs.append(SeqSlice(table, start, 1))
            fast, general = PagedBatch._build_decode(seqs, 8, rope), PagedBatch._build_any(seqs, 8, rope)
            for name in ("positions", "slots", "cos", "sin", "decode_tokens"):
                a, b = getattr(fast, name), getattr(general, name)
                assert a.dtype == b.dtype and torch.equal(a, b), name
            for name in ("decode_tables", "decode_lens"):
                a, b = getattr(fast, name), getattr(general, name)
                assert a.dtype == b.dtype and np.array_equal(a, b), name
            assert fast.chunks == general.chunks == []
    short = [SeqSlice((4,), 8, 1)]
    for build in (PagedBatch._build_decode, PagedBatch._build_any):
        with pytest.raises(ValueError, match="cannot hold 9 positions"):
            build(short, 8, rope)
