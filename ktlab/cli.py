"""The ``ktlab`` command line: ``ktlab generate``, ``ktlab info``, ...

Every user error (bad file, bad flag value) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ktlab.errors import KtlabError

EXIT_USAGE = 2


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a prompt, streaming to stdout",
        description="Generate text from a prompt. Text streams to stdout; prefill and decode speeds "
        "go to stderr at the end.",
    )
    p.add_argument("--model", default="tiny", help="bundled model name ('tiny'), a GGUF file or a HF directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="torch compute dtype")
    p.set_defaults(func=cmd_generate)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="architecture, shapes, quant mix, and expert vs other bytes of a model",
        description="Describe a model file: architecture, shapes, quant mix, and how many bytes are "
        "routed experts (what may live on the CPU) vs the rest (what wants the GPU).",
    )
    p.add_argument("model", nargs="?", default="tiny", help="bundled name, GGUF file or HF directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="whole-model prompt processing (pp) and token generation (tg) speed",
        description="Whole-model speed like llama-bench: pp N = prefill N prompt tokens, tg N = generate N "
        "tokens one at a time. Repeats each test and prints mean ± sd tok/s and ms/token. When "
        "llama-cpp-python is installed, llama.cpp runs the same GGUF in the same table.",
    )
    p.add_argument("model", nargs="?", default="tiny", help="bundled name or GGUF file (default: tiny)")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens to prefill (0 = skip; default 512)")
    p.add_argument("--tg", type=int, default=128, help="tokens to generate (0 = skip; default 128)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per test (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--no-peers", action="store_true", help="only ktlab, even if llama-cpp-python is installed")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)


def _add_bench_experts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-experts", help="time the CPU expert kernels vs this machine's bandwidth and peaks, torch, kt-kernel",
        description="Time one fused MoE layer call per shape, weight format, ISA path and token count T, on "
        "random weights and routing: ms per call, GB/s of weight bytes read, GOP/s, % of the read bandwidth "
        "and % of the ISA peak measured here. torch (bf16, int8) and kt-kernel (when installed) run side by side. "
        "Table on stdout, progress on stderr.",
    )
    p.add_argument("--shapes", default=None, help="comma list of 30b-a3b, tiny (default both; --quick: tiny)")
    p.add_argument("--formats", default=None, help="comma list of q8_0, q4_k, q6_k, bf16 (default all)")
    p.add_argument("--isas", default=None, help="comma list of scalar, avx2, avx512, amx (default: all available)")
    p.add_argument("--tokens", default=None, help="comma list of T per call (default 1,4,16,64,512; --quick: 1,16)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: physical cores)")
    p.add_argument("--repeat", type=int, default=None, help="calls timed per row at least (default 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds timed per row at least (default 0.3)")
    p.add_argument("--retries", type=int, default=None,
                   help="re-measure a row up to N times while other processes keep the CPU busy (default 2)")
    p.add_argument("--no-baselines", action="store_true", help="skip torch and kt-kernel")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results and machine info as JSON")
    p.add_argument("--quick", action="store_true", help="a fast subset (tests, smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_experts)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the whole CLI."""
    parser = argparse.ArgumentParser(
        prog="ktlab", description="ktlab: a lab for hybrid CPU+GPU Mixture-of-Experts inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(sub)
    _add_info(sub)
    _add_bench(sub)
    _add_bench_experts(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    """``ktlab generate``."""
    import torch

    from ktlab.model import load_model
    from ktlab.runtime.generate import GenerationStats, SamplingConfig, generate_stream

    sampling = SamplingConfig(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text)
    stats = GenerationStats()
    decoder = tokenizer.stream_decoder()
    out = sys.stdout
    if not args.chat:
        out.write(args.prompt)
    for token in generate_stream(model, prompt_ids, sampling, stop_ids=[tokenizer.eos_id], stats=stats):
        if token in tokenizer.special_ids:
            continue
        out.write(decoder.push(token))
        out.flush()
    out.write("\n")
    out.flush()
    print(
        f"prompt {stats.prompt_tokens} tokens: prefill {stats.prefill_tps:.1f} tok/s | "
        f"generated {stats.generated_tokens} tokens: decode {stats.decode_tps:.1f} tok/s "
        f"({stats.finish_reason})",
        file=sys.stderr,
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``ktlab info``."""
    import json

    from ktlab.info import describe, format_description

    description = describe(args.model)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``ktlab bench``."""
    import json
    from pathlib import Path

    from ktlab.benchmarks.model import format_results, run_bench

    for flag in ("pp", "tg"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    results = run_bench(args.model, pp=args.pp, tg=args.tg, repeat=args.repeat, threads=args.threads,
                        peers=not args.no_peers)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


def cmd_bench_experts(args: argparse.Namespace) -> int:
    """``ktlab bench-experts``."""
    import json
    from pathlib import Path

    from ktlab.benchmarks.experts import BenchConfig, run_bench

    given = {
        "shapes": args.shapes, "formats": args.formats, "isas": args.isas, "tokens": args.tokens,
        "threads": args.threads, "repeat": args.repeat, "min_time": args.min_time, "retries": args.retries,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.no_baselines:
        given["baselines"] = False
    config = BenchConfig.quick(**given) if args.quick else BenchConfig(**given)
    out_path = Path(args.json) if args.json else None
    if out_path is not None and not out_path.parent.is_dir():
        raise ValueError(f"--json: directory {out_path.parent} does not exist")
    report = run_bench(config, progress=not args.no_progress)
    print(report.format_table())
    if out_path is not None:
        out_path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out_path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ktlab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KtlabError, ValueError, OSError) as exc:
        print(f"ktlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ktlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
