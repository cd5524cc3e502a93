"""One convention for every command: ``--json`` prints a JSON document on stdout (tables to
stderr), ``-o/--output`` writes files, the same names for the same things."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ktlab.cli import build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


COMMANDS = subcommands()
SERVERS = {"serve"}  # a server prints no results


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_and_the_shared_flags(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and len(text) > 200
    flags = option_strings(COMMANDS[name])
    if name not in SERVERS:
        assert "--json" in flags and "print the results as JSON on stdout" in " ".join(text.split())
    if {"--threads"} & flags:
        assert "(default: physical cores)" in " ".join(text.split())
    if name != "bench-serve":  # bench-serve's --model is the served name, every other one a model to load
        assert ("--model" in flags) == (name not in ("bench-experts", "bench-policies", "export"))


CHEAP = {
    "generate": ["--prompt", "def f", "--max-tokens", "3"],
    "info": [],
    "bench": ["--pp", "8", "--tg", "2", "--repeat", "1", "--no-peers"],
    "bench-experts": ["--quick", "--shapes", "tiny", "--formats", "q8_0", "--tokens", "1", "--no-baselines",
                      "--no-progress", "--repeat", "1", "--min-time", "0.01"],
    "bench-policies": ["--trace", "preset:qwen3-30b-a3b", "--tokens", "16", "--budgets", "10", "--policies",
                       "lru,value+prefetch", "--no-progress"],
    "bench-deferral": ["--deferrals", "0,1", "--max-tokens", "16"],
}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_json_is_one_document_on_stdout_and_the_table_on_stderr(name, capsys, tmp_path):
    out = tmp_path / f"{name}.json"
    args = [name, *CHEAP[name], "--json"] + (["--output", str(out)] if name != "generate" else [])
    assert main(args) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # stdout is exactly one JSON document
    assert document["command"] == name and document["results"]
    assert captured.err.strip()  # the human-readable part went to stderr
    if name != "generate":  # --output wrote the same document
        assert json.loads(out.read_text()) == document


def test_record_and_export_write_their_files_and_print_json(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    assert main(["record", "--max-tokens", "16", "-o", str(trace), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert trace.is_file() and record["results"]["trace"] == str(trace) and record["results"]["tokens"] > 0
    out = tmp_path / "export"
    assert main(["export", "--trace", str(trace), "--budget", "10", "--output", str(out), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["results"]["files"]
    assert files and all(Path(path).is_file() and Path(path).parent == out for path in files.values())
    assert main(["export", "--trace", str(trace), "--out-dir", str(tmp_path / "old")]) == 0  # the old name works


def test_positional_and_flag_model_are_one_name(capsys):
    assert main(["info", "tiny", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["info", "--model", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == a
    assert main(["info", "tiny", "--model", "other.gguf"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_output_into_a_missing_directory_is_one_line(tmp_path, capsys):
    assert main(["bench-policies", "--trace", "preset:qwen3-30b-a3b", "--tokens", "8", "--budgets", "10",
                 "--policies", "lru", "--output", str(tmp_path / "nope" / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--output: directory" in err and "does not exist" in err and "Traceback" not in err
