"""The ``ktlab`` command line: ``ktlab generate``, ``ktlab info``, ...

Every user error (bad file, bad flag value) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ktlab.cli_output import (
    add_model_arg,
    add_output_args,
    add_seed_arg,
    add_threads_arg,
    check_output_path,
    emit,
    resolve_model,
    text_stream,
)
from ktlab.errors import KtlabError

EXIT_USAGE = 2


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a prompt, streaming to stdout",
        description="Generate text from a prompt. Text streams to stdout; prefill and decode speeds "
        "go to stderr at the end.",
    )
    add_model_arg(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    add_seed_arg(p, None, "sampling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="torch compute dtype (default float32; bfloat16 for the dense part on --accelerator cuda)")
    p.add_argument("--deferral", type=int, default=0,
                   help="expert deferral: each token's N lowest-weight experts of a layer join the next layer's "
                        "output, their CPU work overlapping it (KTransformers; changes the model a little, see "
                        "`ktlab bench-deferral`; default 0: exact)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="apply a LoRA adapter (PEFT format, e.g. from `ktlab finetune`) without merging it")
    _add_hybrid_args(p)
    add_output_args(p, output_help=None)
    p.set_defaults(func=cmd_generate)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="LoRA fine-tuning with the experts kept quantized on the CPU",
        description="Fine-tune LoRA adapters on the attention projections of a GGUF model. The frozen experts "
        "run forward and backward in the C++ kernels on their stored blocks (never dequantized whole); the "
        "dense part in torch. Data: JSON lines of {\"messages\": [...]} (chat: only assistant turns are "
        "learned) or {\"text\": ...}. Progress (loss, tok/s) on stderr; the adapter (PEFT format: "
        "adapter_config.json + adapter_model.safetensors) and finetune.json in --output.",
    )
    add_model_arg(p, help="bundled name or GGUF file (default tiny)")
    p.add_argument("--data", default=None,
                   help="JSON-lines file (default: the bundled python_qa.jsonl, 40 chat records, CC0)")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (default 16)")
    p.add_argument("--expert-lora", action="store_true",
                   help="adapters on every expert's gate, up and down too (the experts then run in torch around "
                        "their frozen block products; PEFT loads only the attention part)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps, one record each (default 100)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per record at most (default 256)")
    p.add_argument("--heldout", type=float, default=0.1, help="share of records held out for the loss (default 0.1)")
    add_seed_arg(p, 0, "the data order and the adapter's init")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps under --output (0: off)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from a checkpoint directory")
    p.add_argument("--merge", default=None, metavar="GGUF",
                   help="also write the model with the adapter merged in (re-quantized projections) to this GGUF")
    add_output_args(p, output_help="adapter directory (default ktlab-lora)", output_default="ktlab-lora")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)


def _add_bench_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-finetune", help="LoRA training speed and memory: ktlab vs transformers + peft",
        description="Train rank-r LoRA adapters on q/k/v/o of a Qwen3-MoE GGUF for a few steps of random "
        "tokens, with ktlab (experts quantized on the CPU) and with transformers + peft (the same weights "
        "dequantized to float32), each in its own process, same threads: tok/s and peak RSS side by side. "
        "Needs peft.",
    )
    add_model_arg(p, positional=True, help="bundled name or Qwen3-MoE GGUF (default tiny)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up; default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens a step (default 128)")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank (default 8)")
    add_threads_arg(p)
    add_output_args(p)
    p.set_defaults(func=cmd_bench_finetune, output_is_results=True)


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    """``ktlab bench-finetune``."""
    from ktlab.benchmarks.finetune import format_results, run_bench

    for flag in ("steps", "seq_len", "lora_rank"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    results = run_bench(resolve_model(args), steps=args.steps, seq_len=args.seq_len, rank=args.lora_rank,
                        threads=args.threads)
    emit(args, "bench-finetune", [r.to_dict() for r in results], format_results(results))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """``ktlab finetune``."""

    from ktlab.train.finetune import BUNDLED_DATA, FinetuneConfig, finetune

    config = FinetuneConfig(data=args.data or str(BUNDLED_DATA), lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                            steps=args.steps, lr=args.lr, max_len=args.max_len, heldout=args.heldout, seed=args.seed,
                            save_every=args.save_every, expert_lora=args.expert_lora)
    model = resolve_model(args)
    result = finetune(model, config, output=args.output, resume=args.resume, progress=not args.no_progress)
    if args.merge:
        from ktlab.train.merge import merge_adapter

        merge_adapter(model, args.output, args.merge, progress=not args.no_progress)
    held = (f"held-out loss {result.heldout_before:.3f} -> {result.heldout_after:.3f}; "
            if result.heldout_before is not None else "")
    emit(args, "finetune", result.to_dict(),
         f"finetune: {result.steps} steps, {held}{result.tok_s:.0f} tok/s (experts fwd+bwd "
         f"{result.expert_seconds:.1f} of {result.seconds:.1f} s), peak RSS {result.peak_rss_mb:.0f} MB; "
         f"adapter in {result.output}")
    return 0


def _add_hybrid_args(p: argparse.ArgumentParser) -> None:
    """The hybrid CPU+GPU expert flags (``generate``, ``serve``, ``bench``); see :func:`_hybrid_config`."""
    hybrid = p.add_argument_group("hybrid CPU+GPU experts (off unless --accelerator is given)")
    hybrid.add_argument("--accelerator", default=None,
                        help="cuda (dense part, KV cache and hot experts on the GPU), torch:cpu (the same device code "
                             "with the CPU as the device: measured, labeled torch:cpu), or simulated:PROFILE "
                             "(rtx4090-24g, rtx3090-24g, a100-80g, h100-80g, h200-141g: modeled)")
    hybrid.add_argument("--policy", default="value",
                        help="lru, lfu, value (default), each also with +prefetch (copy the experts the hidden state "
                             "predicts for the next layer while this one computes), or "
                             "static:uniform|frequency|front-loading|random")
    hybrid.add_argument("--vram-budget", type=float, default=None,
                        help="GB of GPU memory: for experts (simulated), or for the dense part, KV cache and "
                             "experts together (cuda, torch:cpu)")
    hybrid.add_argument("--budget", type=float, default=15.0,
                        help="GPU experts as %% of all experts when --vram-budget is not given (default 15)")
    hybrid.add_argument("--trace", default=None, help="a `ktlab record` trace whose counts static placements use")


def _hybrid_config(args: argparse.Namespace):
    """The ``HybridConfig`` of the hybrid flags, or None without --accelerator (validated here,
    before a model loads: a bad profile or cuda without a GPU is one line at once)."""
    if not args.accelerator:
        return None
    from ktlab.runtime.hybrid import HybridConfig
    from ktlab.sched.stats import Trace

    counts = Trace.load(args.trace).counts() if args.trace else None
    return HybridConfig(accelerator=args.accelerator, policy=args.policy, budget=args.budget / 100,
                        vram_budget_gb=args.vram_budget, counts=counts)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="architecture, shapes, quant mix, and expert vs other bytes of a model",
        description="Describe a model file: architecture, shapes, quant mix, and how many bytes are "
        "routed experts (what may live on the CPU) vs the rest (what wants the GPU).",
    )
    add_model_arg(p, positional=True)
    add_output_args(p)
    p.set_defaults(func=cmd_info, output_is_results=True)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="whole-model prompt processing (pp) and token generation (tg) speed",
        description="Whole-model speed like llama-bench: pp N = prefill N prompt tokens, tg N = generate N "
        "tokens one at a time. Repeats each test and prints mean ± sd tok/s and ms/token. When "
        "llama-cpp-python is installed, llama.cpp runs the same GGUF in the same table.",
    )
    add_model_arg(p, positional=True, help="bundled name or GGUF file (default: tiny)")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens to prefill (0 = skip; default 512)")
    p.add_argument("--tg", type=int, default=128, help="tokens to generate (0 = skip; default 128)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per test (default 3)")
    add_threads_arg(p)
    p.add_argument("--no-peers", action="store_true", help="only ktlab, even if llama-cpp-python is installed")
    _add_hybrid_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_bench, output_is_results=True)


def _add_bench_experts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-experts", help="time the CPU expert kernels vs this machine's bandwidth and peaks, torch, kt-kernel",
        description="Time one fused MoE layer call per shape, weight format, ISA path and token count T, on "
        "random weights and routing: ms per call, GB/s of weight bytes read, GOP/s, % of the read bandwidth "
        "and % of the ISA peak measured here. torch (bf16, int8) and kt-kernel (when installed) run side by side. "
        "Table on stdout, progress on stderr.",
    )
    p.add_argument("--shapes", default=None,
                   help="comma list of 30b-a3b, gpt-oss-20b, tiny (default 30b-a3b,tiny; --quick: tiny; rows "
                        "that are no whole blocks of a format fall back to Q8_0, as llama.cpp's files do)")
    p.add_argument("--formats", default=None,
                   help="comma list of q8_0, q4_k, q5_k, q6_k, bf16, mxfp4, q4_k_m, q5_k_m (default all; the mixes: "
                        "gate/up Q4_K or Q5_K with a Q6_K down projection, as a K_M file's more-bits layers)")
    p.add_argument("--isas", default=None, help="comma list of scalar, avx2, avx512, amx (default: all available)")
    p.add_argument("--tokens", default=None, help="comma list of T per call (default 1,4,16,64,512; --quick: 1,16)")
    add_threads_arg(p, "kernel threads")
    p.add_argument("--repeat", type=int, default=None, help="calls timed per row at least (default 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds timed per row at least (default 0.3)")
    p.add_argument("--retries", type=int, default=None,
                   help="re-measure a row up to N times while other processes keep the CPU busy (default 2)")
    p.add_argument("--no-baselines", action="store_true", help="skip torch and kt-kernel")
    p.add_argument("--quick", action="store_true", help="a fast subset (tests, smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(p, output_help="also write the results and machine info as JSON to PATH")
    p.set_defaults(func=cmd_bench_experts, output_is_results=True)


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record", help="record a model's expert routing on a prompt set into a trace file",
        description="Run a model over prompts (teacher-forced, up to --max-tokens tokens each) and save the "
        "router's choices and weights per token and layer as a .npz trace, with per-(layer, expert) counts "
        "printed at the end. Traces feed bench-policies, placements and export.",
    )
    add_model_arg(p)
    p.add_argument("--prompts", default=None,
                   help="text file, one prompt per paragraph (default: the bundled Python-docs prompt set)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per prompt at most (default 256)")
    p.add_argument("--ahead", type=int, default=2,
                   help="also store each layer's experts as predicted from the hidden state 1..N layers earlier "
                        "(the next layers' routers on it; what +prefetch policies replay; 0: none; default 2)")
    add_output_args(p, output_help="the .npz trace to write", output_required=True)
    p.set_defaults(func=cmd_record)


def _add_bench_policies(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-policies", help="replay routing traces through every placement and cache policy (simulated GPU)",
        description="Replay traces through static placements (uniform, frequency) and expert caches (LRU, LFU, "
        "value-driven, Belady's offline optimum) at several VRAM budgets, with the greedy CPU/GPU/fetch "
        "scheduler: hit rate, PCIe copies, modeled decode and prefill tok/s. POLICY+prefetch also copies the "
        "experts each layer's hidden state predicts for the next layer while it computes (belady+prefetch: "
        "the oracle that knows them). The GPU is a profile, so every time is simulated. With no flags: the "
        "calibrated Qwen3-30B-A3B preset and the tiny model's real traces at 5/10/15/30%.",
    )
    p.add_argument("--trace", action="append", default=None,
                   help="a trace: preset:NAME, a model (tiny, a GGUF), or a .npz from `ktlab record` "
                   "(repeatable; default: preset:qwen3-30b-a3b and tiny)")
    p.add_argument("--budgets", default="5,10,15,30", help="VRAM budgets, %% of all experts (default 5,10,15,30)")
    p.add_argument("--profile", default="rtx4090-24g", help="accelerator profile (default rtx4090-24g)")
    p.add_argument("--policies", default=None, help="comma list (default: static:uniform, static:frequency, "
                   "redistribute, lru, lfu, value, belady, value+prefetch, belady+prefetch)")
    p.add_argument("--tokens", type=int, default=384, help="decode tokens of a preset trace (default 384)")
    p.add_argument("--deferral", type=int, default=0, help="experts per token deferred to the next layer")
    p.add_argument("--calibrate", action="store_true",
                   help="time this machine's CPU engine for the 30B shape first (cached) instead of the defaults")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(p)
    p.set_defaults(func=cmd_bench_policies, output_is_results=True)


def _add_bench_deferral(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-deferral", help="accuracy cost of expert deferral: top-1 agreement and perplexity",
        description="Teacher-force prompts through the model with 0, 1, 2, ... deferred experts per token "
        "(their output joins one layer late) and compare each position's top-1 token and the perplexity "
        "with the exact model.",
    )
    add_model_arg(p)
    p.add_argument("--prompts", default=None, help="text file, one prompt per paragraph (default: bundled set)")
    p.add_argument("--deferrals", default="0,1,2", help="comma list of deferred experts per token (default 0,1,2)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per prompt at most (default 256)")
    add_output_args(p)
    p.set_defaults(func=cmd_bench_deferral, output_is_results=True)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from ktlab.export import TARGETS

    p = sub.add_parser(
        "export", help="a tuned placement -> KTransformers/SGLang flags, rule YAML, llama.cpp -ot, ktlab TOML",
        description="Make a placement from a recorded trace (or load a ktlab TOML) and write it for production "
        "engines: KTransformers/SGLang launch flags with the statistics file, a KTransformers optimize-rule "
        "YAML, llama.cpp --override-tensor / --n-cpu-moe flags, and a ktlab TOML. docs/export.md says what "
        "each target can express.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="a .npz trace from `ktlab record` (the counts the placement is made from)")
    src.add_argument("--config", help="a ktlab TOML written earlier by `ktlab export`")
    p.add_argument("--target", default="all", choices=TARGETS, help="what to write (default all)")
    p.add_argument("--strategy", default="frequency", help="placement strategy (default frequency)")
    p.add_argument("--budget", type=float, default=15.0, help="GPU experts, %% of all experts (default 15)")
    p.add_argument("--threshold", type=float, default=None, help="for --strategy threshold: activation share t")
    p.add_argument("--deferral", type=int, default=0, help="deferred experts per token to export (default 0)")
    p.add_argument("--model-name", default="model", help="name recorded in the exported files")
    add_output_args(p, output_help="directory for the exported files (--out-dir: the same)")
    p.add_argument("--out-dir", dest="output", help=argparse.SUPPRESS)  # its name before the convention
    p.set_defaults(func=cmd_export)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible server with continuous batching (default http://127.0.0.1:10002)",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions and /v1/completions "
        "(streaming or not), /v1/models, /health, /metrics (Prometheus). Concurrent requests are batched: "
        "every step runs the tokens of all running requests through the model at once, so each expert's "
        "weights are read once per step. With --accelerator, hot experts live on the GPU as in `ktlab generate`: "
        "each batched step is one step of the expert cache and scheduler, and /metrics adds the expert hit rate, "
        "copies and modeled tok/s (ktlab_hybrid_*; named 'simulated' on a simulated accelerator).",
    )
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=10002, help="port (default 10002)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-name", default=None, help="model id reported by /v1/models (default: from --model)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests running at once at most (default 16)")
    p.add_argument("--max-tokens-in-batch", type=int, default=512,
                   help="tokens per step at most: decode tokens + prefill chunks (default 512)")
    p.add_argument("--page-size", type=int, default=16, help="KV cache positions per page (default 16)")
    p.add_argument("--kv-memory-gb", type=float, default=1.0, help="memory for the KV page pool (default 1 GB)")
    p.add_argument("--kv-pages", type=int, default=None, help="pages in the KV pool (overrides --kv-memory-gb)")
    limits = p.add_argument_group("limits on the way in (over one: 413 or 429 with an OpenAI error body)")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="request body size at most (default 1048576: 1 MiB)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt tokens at most, after the chat template (default: the context length)")
    limits.add_argument("--max-connections", type=int, default=256,
                        help="/v1 requests in flight at once at most (default 256)")
    limits.add_argument("--max-queue", type=int, default=1024,
                        help="requests waiting for the engine at most (default 1024)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that gives none (default 256)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads for attention and dense ops (default 0 = auto: one for decode-sized steps, "
                   "where more threads fight the C++ expert pool for cores, all for steps with prefill chunks)")
    p.add_argument("--threads", type=int, default=None,
                   help="C++ kernel threads for experts, dense projections and attention (default: physical "
                   "cores); on a machine where the HTTP event loop and clients share the cores, fewer can be faster")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="torch compute dtype (default float32; bfloat16 for the dense part on --accelerator cuda)")
    p.add_argument("--bandwidth", default="auto", metavar="GB/s|auto|off",
                   help="the machine's read bandwidth for the bandwidth-bound ideal of decode steps on /metrics "
                   "(ktlab_decode_ideal_tokens_per_second, ktlab_decode_share_of_ideal); 'auto' (default) measures "
                   "it at start (about a second) and again every 0.5 s while decoding (a 4 ms probe: a shared "
                   "host's bandwidth swings within seconds), so each step is judged at the bandwidth of its "
                   "moment; a number fixes it; 'off' leaves the ideal out")
    p.add_argument("--paired-reads", action="store_true",
                   help="for benchmarks: right after a sampled decode step, read its own weight bytes again (its "
                   "experts and the dense weights, where they live) and time that: the step's bandwidth-bound "
                   "ideal in its own moment, on /metrics as ktlab_decode_paired_* (at most 5%% of the time; every "
                   "expert on the CPU)")
    p.add_argument("--prefix-cache-gpu", type=float, default=0.0, metavar="GB",
                   help="prefix cache tier in GPU memory (simulated budget without CUDA; default 0: off)")
    p.add_argument("--prefix-cache-ram", type=float, default=0.0, metavar="GB",
                   help="prefix cache tier in host memory (default 0: off)")
    p.add_argument("--prefix-cache-disk", default=None, metavar="PATH:GB",
                   help="prefix cache tier on disk: a directory and a budget; survives restarts")
    _add_hybrid_args(p)
    p.set_defaults(func=cmd_serve)


def _add_bench_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-serve", help="speed of an OpenAI-compatible server: prefill and decode tok/s per request and in total",
        description="Send streaming chat requests with built-in prompts of the given lengths to any "
        "OpenAI-compatible server, C at a time, and print per request the prefill speed (prompt tokens / "
        "time to first token) and decode speed, then totals: the aggregate decode rate over all requests' "
        "span and the steady rate while all C decode at once. Prompt token counts come from the server's "
        "usage when it reports them.",
    )
    p.add_argument("--api-url", default="http://127.0.0.1:10002", help="server base URL (default: ktlab serve's)")
    p.add_argument("--model", default="tiny", help="model name sent in the requests (default tiny)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="prompt lengths in tokens, about (default 1024 2048 4096)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per request (default 128)")
    p.add_argument("--concurrent", type=int, default=1, help="requests in flight at once (default 1)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests in all (default: one per prompt length, at least --concurrent)")
    p.add_argument("--api-key", default=None, help="Bearer token to send")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate exactly --max-tokens (vLLM/SGLang/ktlab 'ignore_eos')")
    add_output_args(p)
    p.set_defaults(func=cmd_bench_serve, output_is_results=True)


def _add_bench_prefix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-prefix", help="prefix cache benchmark: a shared-prefix workload with the cache off / RAM / "
        "RAM+disk / after a restart",
        description="Run requests that share one prefix through the engine (in process) with the prefix cache "
        "off, in RAM, in RAM + disk and after a restart over the same disk directory; print time, prompt tokens "
        "prefilled and served from the cache, hits per tier, and whether outputs equal the cache-off ones.",
    )
    add_model_arg(p)
    p.add_argument("--shared-tokens", type=int, default=128, help="tokens of the shared prefix (default 128)")
    p.add_argument("--tail-tokens", type=int, default=8, help="tokens each request adds (default 8)")
    p.add_argument("--requests", type=int, default=8, help="requests (default 8)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request (default 8)")
    p.add_argument("--page-size", type=int, default=16, help="KV positions per page (default 16)")
    p.add_argument("--disk-dir", default=None, help="disk tier directory (default: a temporary one)")
    p.add_argument("--workload", default="system-prompt", metavar="system-prompt|few-shot|multi-turn",
                   help="system-prompt: many requests share --shared-tokens; few-shot: a header of --shots examples "
                   "of --shared-tokens each; multi-turn: one chat of --requests turns, each --tail-tokens of user "
                   "message on top of the previous prompt and reply (default system-prompt)")
    p.add_argument("--shots", type=int, default=4, help="few-shot: examples in the header (default 4)")
    p.add_argument("--modes", nargs="+", default=["off", "ram", "ram+disk", "restart"],
                   metavar="off|ram|ram+disk|restart", help="cache configurations to run, in order (default: all)")
    add_output_args(p)
    p.set_defaults(func=cmd_bench_prefix, output_is_results=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the whole CLI."""
    parser = argparse.ArgumentParser(
        prog="ktlab", description="ktlab: a lab for hybrid CPU+GPU Mixture-of-Experts inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(sub)
    _add_finetune(sub)
    _add_bench_finetune(sub)
    _add_info(sub)
    _add_bench(sub)
    _add_bench_experts(sub)
    _add_record(sub)
    _add_bench_policies(sub)
    _add_bench_deferral(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_bench_serve(sub)
    _add_bench_prefix(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    """``ktlab generate``."""

    from ktlab.model import load_model
    from ktlab.runtime.generate import GenerationStats, SamplingConfig, generate_stream

    sampling = SamplingConfig(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )
    hybrid_config = _hybrid_config(args)
    model, tokenizer = load_model(args.model, **_model_placement(args, hybrid_config))
    if args.lora:
        from ktlab.model import open_weights
        from ktlab.train.lora import load_adapter

        load_adapter(model, args.lora, open_weights(args.model))
    if not 0 <= args.deferral < model.cfg.num_experts_per_tok:
        raise ValueError(f"--deferral must be in [0, {model.cfg.num_experts_per_tok - 1}] (the model routes "
                         f"top-{model.cfg.num_experts_per_tok}), got {args.deferral}")
    model.deferral = args.deferral
    hybrid = _attach_hybrid(model, args.model, hybrid_config) if hybrid_config is not None else None
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text)
    stats = GenerationStats()
    decoder = tokenizer.stream_decoder()
    out = text_stream(args)  # the text streams to stdout, or to stderr when --json prints the result there
    pieces = []
    if not args.chat:
        out.write(args.prompt)
    for token in generate_stream(model, prompt_ids, sampling, stop_ids=[tokenizer.eos_id], stats=stats):
        if token in tokenizer.special_ids:
            continue
        pieces.append(decoder.push(token))
        out.write(pieces[-1])
        out.flush()
    out.write("\n")
    out.flush()
    print(
        f"prompt {stats.prompt_tokens} tokens: prefill {stats.prefill_tps:.1f} tok/s | "
        f"generated {stats.generated_tokens} tokens: decode {stats.decode_tps:.1f} tok/s "
        f"({stats.finish_reason})",
        file=sys.stderr,
    )
    if hybrid is not None:
        print(hybrid.stats.summary(), file=sys.stderr)
    if args.json:
        emit(args, "generate", {"text": "".join(pieces), "prompt_tokens": stats.prompt_tokens,
                                "generated_tokens": stats.generated_tokens, "finish_reason": stats.finish_reason,
                                "prefill_tok_s": stats.prefill_tps, "decode_tok_s": stats.decode_tps},
             hybrid=None if hybrid is None else hybrid.metrics())
    return 0


def _model_placement(args: argparse.Namespace, hybrid_config) -> dict:
    """``load_model`` keywords for the flags: the dense part on a real accelerator (``--accelerator
    cuda`` or ``torch:cpu``; bfloat16 on CUDA unless ``--dtype`` says otherwise), else the CPU."""
    import torch

    from ktlab.runtime.hybrid import dense_device

    device = dense_device(hybrid_config)
    dtype = args.dtype or ("bfloat16" if device is not None and device.type == "cuda" else "float32")
    return {"dtype": getattr(torch, dtype), **({"device": device} if device is not None else {})}


def _attach_hybrid(model, model_path: str, config):
    from ktlab.model import open_weights
    from ktlab.runtime.hybrid import attach_hybrid

    return attach_hybrid(model, open_weights(model_path), config)


def cmd_info(args: argparse.Namespace) -> int:
    """``ktlab info``."""
    from ktlab.info import describe, format_description

    description = describe(args.model)
    emit(args, "info", description, None if args.json else format_description(description))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``ktlab bench``."""
    from ktlab.benchmarks.model import format_results, run_bench

    for flag in ("pp", "tg"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    results = run_bench(args.model, pp=args.pp, tg=args.tg, repeat=args.repeat, threads=args.threads,
                        peers=not args.no_peers, hybrid=_hybrid_config(args))
    emit(args, "bench", [r.to_dict() for r in results], format_results(results))
    return 0


def cmd_bench_experts(args: argparse.Namespace) -> int:
    """``ktlab bench-experts``."""
    from ktlab.benchmarks.experts import BenchConfig, run_bench

    given = {
        "shapes": args.shapes, "formats": args.formats, "isas": args.isas, "tokens": args.tokens,
        "threads": args.threads, "repeat": args.repeat, "min_time": args.min_time, "retries": args.retries,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.no_baselines:
        given["baselines"] = False
    config = BenchConfig.quick(**given) if args.quick else BenchConfig(**given)
    report = run_bench(config, progress=not args.no_progress)
    document = report.to_json()
    emit(args, "bench-experts", document.pop("results"), report.format_table(), **document)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """``ktlab record``."""
    from pathlib import Path

    from ktlab.benchmarks.policies import PROMPTS, read_prompts
    from ktlab.model import load_model
    from ktlab.runtime.record import record_trace
    from ktlab.sched.stats import accuracy_json, format_accuracy, reuse_rate, top_share

    out = check_output_path(args.output)
    prompts = Path(args.prompts) if args.prompts else PROMPTS
    model, tokenizer = load_model(args.model)
    trace = record_trace(model, tokenizer, read_prompts(prompts), args.max_tokens,
                         {"model": str(args.model), "prompts": str(prompts)}, ahead=args.ahead)
    trace.save(out)
    counts = trace.counts()
    hot, reuse = float(top_share(counts, 0.10).mean()), float(reuse_rate(trace.ids, 1).mean())
    lines = [f"recorded {trace.ids.shape[0]} tokens x {trace.ids.shape[1]} layers x top-{trace.ids.shape[2]} "
             f"from {trace.meta['texts']} prompts -> {out}",
             f"hottest 10% of experts take {hot * 100:.1f}% of activations; next-token reuse {reuse * 100:.1f}%"]
    accuracy = None
    if trace.predicted is not None:
        table = trace.accuracy()
        lines.append(format_accuracy(table))
        accuracy = accuracy_json(table)
    emit(args, "record", {"trace": str(out), "tokens": int(trace.ids.shape[0]), "layers": int(trace.ids.shape[1]),
                          "top_k": int(trace.ids.shape[2]), "hottest_10pct_share": hot, "next_token_reuse": reuse,
                          "prediction_accuracy": accuracy}, "\n".join(lines))
    return 0


def _policy_sources(args: argparse.Namespace):
    from pathlib import Path

    from ktlab.benchmarks.policies import file_source, model_source, preset_source

    sources = []
    for spec in args.trace or ["preset:qwen3-30b-a3b", "tiny"]:
        if spec.startswith("preset:"):
            sources.append(preset_source(spec.removeprefix("preset:"), tokens=args.tokens))
        elif spec.endswith(".npz"):
            sources.append(file_source(Path(spec)))
        else:
            sources.append(model_source(spec))
    return sources


def cmd_bench_policies(args: argparse.Namespace) -> int:
    """``ktlab bench-policies``."""

    from ktlab.benchmarks.policies import POLICY_ORDER, parse_budgets, run_policies
    from ktlab.sched.cost import DEFAULT_CPU, calibrate_cpu

    budgets = parse_budgets(args.budgets)
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else POLICY_ORDER
    cpu = calibrate_cpu(progress=not args.no_progress) if args.calibrate else DEFAULT_CPU
    report = run_policies(_policy_sources(args), budgets, policies, args.profile, cpu, deferral=args.deferral,
                          progress=not args.no_progress)
    document = report.to_json()
    emit(args, "bench-policies", document.pop("results"), report.format_table(), **document)
    return 0


def cmd_bench_deferral(args: argparse.Namespace) -> int:
    """``ktlab bench-deferral``."""
    import dataclasses
    from pathlib import Path

    from ktlab.benchmarks.deferral import format_rows, measure_deferral
    from ktlab.benchmarks.policies import PROMPTS, read_prompts
    from ktlab.model import load_model

    try:
        deferrals = tuple(int(d) for d in args.deferrals.split(","))
    except ValueError:
        raise ValueError(f"--deferrals must be comma-separated integers, got {args.deferrals!r}") from None
    model, tokenizer = load_model(args.model)
    texts = read_prompts(Path(args.prompts) if args.prompts else PROMPTS)
    rows = measure_deferral(model, tokenizer, texts, deferrals, args.max_tokens)
    emit(args, "bench-deferral", [dataclasses.asdict(r) for r in rows], format_rows(rows), model=args.model)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``ktlab export``."""
    from ktlab.export import ExportOptions, export, load_toml
    from ktlab.sched.placement import budget_from_fraction, make_placement
    from ktlab.sched.stats import Trace

    if args.config:
        placement, options = load_toml(args.config)
    else:
        trace = Trace.load(args.trace)
        counts = trace.counts()
        L, E = counts.shape
        params = {"t": args.threshold} if args.threshold is not None else {}
        placement = make_placement(args.strategy, budget_from_fraction(args.budget / 100, L, E), counts, **params)
        options = ExportOptions(model_name=args.model_name, deferral=args.deferral,
                                first_moe_layer=int(trace.meta.get("first_moe_layer", 0)))
    if not args.output:
        raise ValueError("-o/--output DIR is required: the directory for the exported files")
    result = export(placement, args.target, args.output, options)
    emit(args, "export", {"files": {role: str(path) for role, path in result.paths.items()},
                          "gpu_experts": placement.num_gpu_experts}, result.summary)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``ktlab serve``."""
    from pathlib import Path

    from ktlab.model import BUNDLED, load_model, open_weights, resolve_model_path
    from ktlab.serve.api import check_bindable, create_app, run_server
    from ktlab.serve.engine import Engine, EngineConfig
    from ktlab.serve.kv import KVConfig
    from ktlab.serve.prefix import PrefixCacheConfig, model_fingerprint, scope_for

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.default_max_tokens < 1:
        raise ValueError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    from ktlab.serve.schema import ServeLimits

    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                         max_connections=args.max_connections, max_queue=args.max_queue)
    check_bindable(args.host, args.port)  # before the model loads: fail fast
    config = EngineConfig(max_batch_size=args.max_batch_size, max_tokens_in_batch=args.max_tokens_in_batch,
                          kv=KVConfig(page_size=args.page_size, memory_gb=args.kv_memory_gb,
                                      num_pages=args.kv_pages), torch_threads=args.torch_threads or None,
                          hybrid=_hybrid_config(args), bandwidth_gbs=_bandwidth(args.bandwidth),
                          track_bandwidth=args.bandwidth == "auto", paired_reads=args.paired_reads)
    disk_dir, disk_gb = PrefixCacheConfig.parse_disk(args.prefix_cache_disk) if args.prefix_cache_disk else (None, 0)
    prefix = PrefixCacheConfig(gpu_gb=args.prefix_cache_gpu, ram_gb=args.prefix_cache_ram, disk_dir=disk_dir,
                               disk_gb=disk_gb)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    model, tokenizer = load_model(args.model, threads=args.threads, **_model_placement(args, config.hybrid))
    name = args.served_name or (args.model if args.model in BUNDLED else Path(args.model).stem)
    cache = None
    if prefix.enabled:
        model_id = model_fingerprint(resolve_model_path(args.model))
        cache = prefix.build(scope_for(model, model_id, config.kv.page_size))
        tiers = ", ".join(f"{t.name} {t.capacity_bytes / 1e9:g} GB ({len(t)} pages)" for t in cache.tiers)
        print(f"ktlab serve: prefix cache: {tiers}", file=sys.stderr, flush=True)
    weights = open_weights(args.model) if config.hybrid is not None else None
    engine = Engine(model, tokenizer, config, prefix_cache=cache, weights=weights).start()
    app = create_app(engine, tokenizer, name, api_key=args.api_key, default_max_tokens=args.default_max_tokens,
                     limits=limits)
    print(f"ktlab serve: {name} on http://{args.host}:{args.port}/v1 ({engine.blocks.num_pages} KV pages of "
          f"{config.kv.page_size}, batch <= {config.max_batch_size})", file=sys.stderr, flush=True)
    if engine.hybrid is not None:
        print(_hybrid_line(engine.hybrid), file=sys.stderr, flush=True)
    try:
        run_server(app, args.host, args.port)
    finally:
        engine.stop()
        if engine.hybrid is not None:
            print(engine.hybrid.stats.summary(), file=sys.stderr, flush=True)
    return 0


def _bandwidth(value: str) -> float | None:
    """``--bandwidth``: GB/s, 'auto' (measured now; the engine re-measures while decoding) or
    'off' (None)."""
    if value == "off":
        return None
    if value == "auto":
        from ktlab.benchmarks.machine import measure_read_bandwidth

        measured = measure_read_bandwidth(passes=3, keep_buffer=False)
        print(f"ktlab serve: read bandwidth {measured:.1f} GB/s (measured; --bandwidth to set it)", file=sys.stderr,
              flush=True)
        return measured
    try:
        gbs = float(value)
    except ValueError:
        raise ValueError(f"--bandwidth must be GB/s, 'auto' or 'off', got {value!r}") from None
    if not gbs > 0:
        raise ValueError(f"--bandwidth must be > 0 GB/s, got {value!r}")
    return gbs


def _hybrid_line(hybrid) -> str:
    """The startup line of a hybrid server: what is placed where, and which figures it reports."""
    speed = "simulated" if hybrid.accelerator.simulated else "modeled"
    return (f"ktlab serve: hybrid experts on {hybrid.describe()}; /metrics reports the expert hit rate, copies "
            f"and {speed} tok/s (ktlab_hybrid_*), and the totals print at shutdown")


def cmd_bench_prefix(args: argparse.Namespace) -> int:
    """``ktlab bench-prefix``."""
    from dataclasses import asdict

    from ktlab.model import load_model, resolve_model_path
    from ktlab.serve.bench_prefix import PrefixBenchConfig, format_results, run_prefix_bench

    config = PrefixBenchConfig(model=args.model, shared_tokens=args.shared_tokens, tail_tokens=args.tail_tokens,
                               requests=args.requests, max_tokens=args.max_tokens, page_size=args.page_size,
                               disk_dir=args.disk_dir, workload=args.workload, shots=args.shots,
                               modes=tuple(args.modes))
    model, _ = load_model(args.model)
    results = run_prefix_bench(config, model, resolve_model_path(args.model))
    emit(args, "bench-prefix", [asdict(r) for r in results], format_results(results), config=asdict(config))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """``ktlab bench-serve``."""

    from ktlab.serve.bench import BenchConfig, format_report, run_bench

    config = BenchConfig(api_url=args.api_url, model=args.model, prompt_lens=tuple(args.prompt_lens),
                         max_tokens=args.max_tokens, concurrent=args.concurrent, requests=args.requests,
                         api_key=args.api_key, timeout=args.timeout, ignore_eos=args.ignore_eos)
    report = run_bench(config, progress=sys.stderr)
    table = format_report(report)
    requests = report.pop("requests")
    emit(args, "bench-serve", requests, table, **report)
    return 0 if report["totals"]["failed"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ktlab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "model"):
            args.model = resolve_model(args)  # --model or the positional MODEL: one name from here on
        if getattr(args, "output_is_results", False):
            check_output_path(args.output)  # before the work: a results file that cannot be written fails now
        return args.func(args)
    except (KtlabError, ValueError, OSError) as exc:
        print(f"ktlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ktlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
