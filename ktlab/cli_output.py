"""The command line's shared pieces: one convention for every ``ktlab`` command.

- ``--json`` prints the command's results as JSON on stdout (tables, progress and notes go to
  stderr, so ``ktlab bench --json | jq`` works);
- ``-o/--output PATH`` writes files: a benchmark's results as JSON, or what the command makes
  (a trace, an adapter, exported configs);
- the same flags for the same things: ``--model``, ``--threads``, ``--seed``.

Every JSON document is an object with ``command`` and ``results`` (plus what the command adds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

MODEL_HELP = "bundled model name ('tiny'), a GGUF file or a Hugging Face directory (default tiny)"


def add_model_arg(p: argparse.ArgumentParser, positional: bool = False, help: str = MODEL_HELP) -> None:
    """``--model`` (default tiny); ``positional``: also accept it as the first argument (older usage)."""
    p.add_argument("--model", default=None, help=help)
    if positional:
        p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="the same as --model")


def resolve_model(args: argparse.Namespace) -> str:
    """The model named by ``--model`` or the positional argument (one of them; default tiny)."""
    given = [m for m in (getattr(args, "model", None), getattr(args, "model_arg", None)) if m is not None]
    if len(given) == 2 and given[0] != given[1]:
        raise ValueError(f"two models given: --model {given[0]} and {given[1]}")
    return given[0] if given else "tiny"


def add_threads_arg(p: argparse.ArgumentParser, what: str = "CPU threads for kernels and torch") -> None:
    """``--threads N`` (default: physical cores)."""
    p.add_argument("--threads", type=int, default=None, help=f"{what} (default: physical cores)")


def add_seed_arg(p: argparse.ArgumentParser, default: int | None, what: str) -> None:
    """``--seed N``."""
    p.add_argument("--seed", type=int, default=default,
                   help=f"random seed for {what}" + (f" (default {default})" if default is not None else ""))


def add_output_args(p: argparse.ArgumentParser, output_help: str | None = "also write the results as JSON to PATH",
                    output_required: bool = False, output_default: str | None = None) -> None:
    """``--json`` (print JSON on stdout) and ``-o/--output PATH`` (``output_help``; None: no --output)."""
    group = p.add_argument_group("output")
    group.add_argument("--json", action="store_true",
                       help="print the results as JSON on stdout (tables, progress and notes go to stderr)")
    if output_help is not None:
        group.add_argument("-o", "--output", metavar="PATH", default=output_default, required=output_required,
                           help=output_help)


def check_output_path(path: str | os.PathLike | None, flag: str = "--output") -> Path | None:
    """``path`` as a Path whose directory exists (ValueError naming the flag otherwise), or None."""
    if path is None:
        return None
    out = Path(path)
    if not out.parent.is_dir():
        raise ValueError(f"{flag}: directory {out.parent} does not exist")
    return out


def text_stream(args: argparse.Namespace):
    """Where human-readable output goes: stderr when ``--json`` owns stdout."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def emit(args: argparse.Namespace, command: str, results: Any, table: str | None = None, **extra: Any) -> None:
    """The one way a command reports: ``table`` to stdout (stderr with --json), the JSON document
    (``{"command", "results", **extra}``) on stdout with --json, and to ``--output`` when the
    command's --output is a results file (written whole through a temporary name, so a full disk
    never leaves half a file)."""
    document = {"command": command, "results": results, **extra}
    if table is not None:
        print(table, file=text_stream(args))
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2))
    out = getattr(args, "output", None) if getattr(args, "output_is_results", False) else None
    if out is not None:  # its directory was checked before the work (ktlab.cli.main)
        write_json(Path(out), document)
        print(f"wrote {out}", file=sys.stderr)


def write_json(path: Path, document: Any) -> None:
    """Write ``document`` as JSON to ``path`` atomically (OSError names the path)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {exc.strerror or exc}") from None
