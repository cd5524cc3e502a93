"""``ktlab record``, ``ktlab bench-policies`` and ``ktlab export`` end to end, and trace files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ktlab.cli import main
from ktlab.export import load_toml
from ktlab.sched.stats import Trace, activation_counts


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "tiny.npz"
    assert main(["record", "--model", "tiny", "--max-tokens", "48", "-o", str(path)]) == 0
    return path


def test_recorded_trace_is_the_reference_router(gguf_f32, hf_model):
    """record_trace vs Hugging Face's router logits (top-k sets), text after text in order."""
    import torch

    from ktlab.model import load_model
    from ktlab.runtime.record import record_trace

    model, tok = load_model(gguf_f32, experts="torch")
    texts = ["The quick brown fox jumps over the lazy dog.", "def main(): return 42"]
    trace = record_trace(model, tok, texts, max_tokens=32)
    k = model.cfg.num_experts_per_tok
    start = 0
    for text in texts:
        ids = tok.encode(text)[:32]
        with torch.no_grad():
            out = hf_model(input_ids=torch.tensor([ids]), output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            ref = torch.topk(logits.float(), k, dim=-1).indices.sort(-1).values.numpy()
            assert np.array_equal(np.sort(trace.ids[start : start + len(ids), layer], -1), ref)
        start += len(ids)
    assert start == trace.ids.shape[0]
    assert np.allclose(trace.weights.sum(-1), 1, atol=1e-5)  # norm_topk_prob
    assert activation_counts(trace.ids, model.cfg.num_experts).sum() == trace.ids.size


def test_trace_file_round_trip(tiny_trace):
    trace = Trace.load(tiny_trace)
    assert trace.ids.dtype == np.int16 and trace.weights.shape == trace.ids.shape
    assert trace.num_experts == 64 and trace.meta["model"] == "tiny" and trace.meta["hidden_size"] == 256


def test_trace_file_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a ktlab trace"):
        Trace.load(bad)
    with pytest.raises(ValueError, match="no such trace file"):
        Trace.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="expert ids"):
        Trace(np.full((2, 1, 1), 9, np.int16), 4)
    assert main(["bench-policies", "--trace", str(bad), "--no-progress"]) == 2


def test_bench_policies_table_and_json(tiny_trace, tmp_path, capsys):
    out = tmp_path / "policies.json"
    code = main(["bench-policies", "--trace", str(tiny_trace), "--trace", "preset:qwen3-30b-a3b", "--tokens", "24",
                 "--budgets", "10,30", "--output", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "simulated on rtx4090-24g" in text and "value closes" in text
    report = json.loads(out.read_text())
    assert report["simulated"] is True
    rows = report["results"]
    assert {r["policy"] for r in rows} == {"static:uniform", "static:frequency", "redistribute", "lru", "lfu", "value",
                                           "belady", "value+prefetch", "belady+prefetch"}
    assert "of Belady on demand" in text and "prediction 1 layer ahead" in text
    assert set(report["prediction_accuracy"]) == {"tiny.npz", "preset:qwen3-30b-a3b"}
    assert report["prediction_accuracy"]["tiny.npz"][0][0] is None  # layer 0 has no earlier layer
    assert {r["budget"] for r in rows} == {0.1, 0.3}
    for trace in {r["trace"] for r in rows}:
        for budget in (0.1, 0.3):
            group = {r["policy"]: r for r in rows if r["trace"] == trace and r["budget"] == budget}
            assert group["belady"]["hit_rate"] >= max(group[p]["hit_rate"] for p in ("lru", "lfu", "value")) - 1e-12


def test_bench_policies_bad_flags(capsys):
    assert main(["bench-policies", "--budgets", "5,abc"]) == 2
    assert "percentages" in capsys.readouterr().err
    assert main(["bench-policies", "--trace", "preset:nope", "--no-progress"]) == 2


def test_export_from_a_trace_round_trips(tiny_trace, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--trace", str(tiny_trace), "--budget", "10", "-o", str(out), "--model-name", "tiny"]) == 0
    placement, options = load_toml(out / "placement.toml")
    counts = Trace.load(tiny_trace).counts()
    assert placement.num_gpu_experts == round(0.10 * counts.size) and options.model_name == "tiny"
    flags = (out / "llama_cpp_flags.txt").read_text()
    for regex in re.findall(r'(blk\\\.\S*?=CPU)', flags):
        re.compile(regex.split("=")[0])
    again = tmp_path / "again"
    assert main(["export", "--config", str(out / "placement.toml"), "-o", str(again), "--target", "toml"]) == 0
    assert (again / "placement.toml").read_text() == (out / "placement.toml").read_text()


def test_generate_hybrid_prints_simulated_figures_and_the_same_text(capsys):
    args = ["generate", "--model", "tiny", "--prompt", "A list comprehension", "--max-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--accelerator", "simulated:rtx4090-24g", "--policy", "lru", "--budget", "20"]) == 0
    hybrid = capsys.readouterr()
    assert hybrid.out == plain.out
    assert "hybrid (simulated rtx4090-24g)" in hybrid.err and "modeled decode" in hybrid.err
    assert main([*args, "--accelerator", "simulated:tpu-v9"]) == 2
    assert "unknown accelerator profile" in capsys.readouterr().err
