"""The ``ktlab`` command line, run as a user would (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ktlab.model import GGUFFile


def ktlab(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "ktlab", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_commands():
    out = ktlab("--help")
    assert out.returncode == 0
    for command in ("generate", "info"):
        assert command in out.stdout


def test_generate_streams_text_and_reports_speeds(gguf_q8):
    out = ktlab("generate", "--model", str(gguf_q8), "--prompt", "The quick", "--max-tokens", "12", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The quick")
    assert len(out.stdout) > len("The quick\n")
    last = out.stderr.strip().splitlines()[-1]
    assert "prefill" in last and "decode" in last and "tok/s" in last


def test_generate_is_reproducible_with_a_seed(gguf_q8):
    args = ("generate", "--model", str(gguf_q8), "--prompt", "fox", "--max-tokens", "10", "--temperature", "1.0")
    a, b = ktlab(*args, "--seed", "7"), ktlab(*args, "--seed", "7")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_info_reports_expert_and_other_bytes(gguf_q8):
    out = ktlab("info", str(gguf_q8), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)["results"]
    f = GGUFFile(gguf_q8)
    total = sum(f.tensor_info(n).nbytes for n in f.tensor_names)
    assert info["expert_bytes"] + info["other_bytes"] == total
    assert info["expert_bytes"] == sum(f.tensor_info(n).nbytes for n in f.tensor_names if "_exps" in n)
    assert info["params_by_type"]["Q8_0"] > 0
    text = ktlab("info", str(gguf_q8)).stdout
    assert "experts" in text and "qwen3moe" in text


@pytest.mark.parametrize("argv", [
    ("generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"),
    ("info", "/nonexistent/model.gguf"),
])
def test_missing_model_is_one_line_exit_2(argv):
    out = ktlab(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nonexistent/model.gguf" in lines[0] and "Traceback" not in out.stderr


def test_bad_sampling_value_is_one_line_exit_2(gguf_q8):
    out = ktlab("generate", "--model", str(gguf_q8), "--prompt", "x", "--top-p", "0")
    assert out.returncode == 2
    assert "top_p" in out.stderr and "Traceback" not in out.stderr


def test_bench_prints_table_and_json(gguf_q8, tmp_path):
    out_json = tmp_path / "bench.json"
    out = ktlab("bench", str(gguf_q8), "--pp", "16", "--tg", "4", "--repeat", "2", "--no-peers",
                "--output", str(out_json))
    assert out.returncode == 0, out.stderr
    assert "pp16" in out.stdout and "tg4" in out.stdout and "ms/token" in out.stdout
    rows = json.loads(out_json.read_text())["results"]
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert all(len(r["tps"]) == 2 and min(r["tps"]) > 0 for r in rows)


def test_bench_rejects_bad_values(gguf_q8):
    out = ktlab("bench", str(gguf_q8), "--repeat", "0")
    assert out.returncode == 2 and "--repeat" in out.stderr and "Traceback" not in out.stderr
