"""``ktlab bench-experts`` and the machine measurements behind its % columns.

No timing assertions beyond positivity and plausibility: this box is small and often busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ktlab.benchmarks import machine
from ktlab.benchmarks.experts import FORMATS, BenchConfig
from ktlab.kernels import available_isas

COLUMNS = ("shape", "format", "engine", "isa", "T", "ms", "GB/s", "GOP/s", "%BW", "%peak", "other")


def bench_experts(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "ktlab", "bench-experts", *args], capture_output=True, text=True, timeout=timeout,
        env=env,
    )


def test_quick_run_prints_the_table_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = bench_experts("--quick", "--shapes", "tiny", "--output", str(path))
    assert out.returncode == 0, out.stderr
    header, rule, *rows = out.stdout.splitlines()
    assert header.split() == [*COLUMNS[:6], "MB", "read", *COLUMNS[6:]]
    assert set(rule) <= {"-", " "}
    ktlab_rows = [r.split() for r in rows if r.startswith("tiny") and r.split()[2] == "ktlab"]
    assert {r[1] for r in ktlab_rows} == set(FORMATS)
    assert {r[3] for r in ktlab_rows} == set(available_isas())
    assert any(r.startswith("machine:") and "GB/s" in r for r in rows)

    report = json.loads(path.read_text())
    assert set(report) >= {"ktlab_version", "machine", "config", "results", "notes"}
    m = report["machine"]
    assert m["cpu_model"] and m["threads"] >= 1
    assert 1 < m["read_bandwidth_gbps"] < 1000
    assert m["peaks_gops"] and all(v > 0 for kinds in m["peaks_gops"].values() for v in kinds.values())
    results = report["results"]
    assert len(results) >= len(ktlab_rows)
    engines = {r["engine"] for r in results}
    assert "ktlab" in engines
    for r in results:
        assert r["shape"] == "tiny" and r["tokens"] in (1, 16)
        for key in ("ms", "bytes_read", "gbps", "gops", "pct_bandwidth", "pct_peak"):
            assert r[key] > 0, (key, r)
        assert r["calls"] >= 3
        assert r["other_cpu"] is None or r["other_cpu"] >= 0
    # torch runs or says why not; so does kt-kernel
    for engine in ("torch", "kt-kernel"):
        assert engine in engines or any(n.startswith(engine) for n in report["notes"]), report["notes"]


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--formats", "q8_0,q5_0", "q5_0"),
        ("--isas", "neon", "neon"),
        ("--tokens", "1,x", "tokens"),
        ("--shapes", "70b", "70b"),
    ],
)
def test_bad_values_exit_2_with_one_line(flag, value, words):
    out = bench_experts("--quick", "--no-baselines", flag, value, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ktlab bench-experts: error:") and words in lines[0], out.stderr
    assert out.stdout == ""


def test_config_validates_and_dedups():
    config = BenchConfig(shapes="tiny,tiny", formats=("Q8_0",), isas="scalar", tokens="1,4,16", threads=1)
    assert config.shapes == ("tiny",) and config.formats == ("q8_0",) and config.isas == ("scalar",)
    assert config.tokens_for("scalar") == (1, 4)
    with pytest.raises(ValueError, match="threads"):
        BenchConfig(threads=0)
    with pytest.raises(ValueError, match="tokens"):
        BenchConfig(tokens="0")


def test_read_bandwidth_is_plausible():
    gbps = machine.measure_read_bandwidth(passes=2)
    assert 1 < gbps < 1000
    assert machine.measure_read_bandwidth(passes=2) == gbps  # cached per process


def test_peaks_are_positive_for_every_available_path():
    measured = {}
    for isa in available_isas():
        for kind in machine.PEAK_KINDS:
            if machine.peak_supported(isa, kind):
                measured[(isa, kind)] = machine.measure_peak(isa, kind, seconds=0.01, runs=1)
    assert ("scalar", "int8") in measured and ("scalar", "fp32") in measured
    assert all(0 < v < 1e6 for v in measured.values()), measured


def test_peak_errors_are_clear():
    with pytest.raises(ValueError, match="kind"):
        machine.measure_peak("scalar", "fp64")
    with pytest.raises(ValueError, match="no bf16"):
        machine.measure_peak("scalar", "bf16")


def test_peak_kind_for_formats():
    assert machine.peak_kind_for("q8_0", "scalar") == "int8"
    assert machine.peak_kind_for("bf16", "scalar") == "fp32"
