#!/usr/bin/env python3
"""Measure the figures of the tiny model's card: perplexity, router skew and temporal locality.

Runs the bundled model (our own engine) over held-out documentation files (those the training
script kept out: every 50th file from the 8th), records the routing trace and prints Markdown
tables for models/README.md, plus JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ktlab.model import load_model  # noqa: E402
from ktlab.runtime.generate import SamplingConfig, generate  # noqa: E402
from ktlab.sched.stats import RoutingRecorder, activation_counts, reuse_rate, top_share  # noqa: E402

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
PROMPTS = [
    "The :mod:`json` module",
    "A list comprehension",
    "def fibonacci(n):",
]


def held_out_texts(corpus: Path) -> list[str]:
    files = sorted(corpus.rglob("*.txt"))
    return [f.read_text(encoding="utf-8", errors="replace").replace("\t", "    ") for i, f in enumerate(files)
            if i % 50 == 7]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--window", type=int, default=512, help="tokens per evaluated document")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()

    model, tok = load_model(args.model)
    cfg = model.cfg
    recorder = RoutingRecorder(cfg.num_layers, cfg.num_experts_per_tok)
    model.add_route_observer(recorder)
    nll, count = 0.0, 0
    traces = []
    for text in held_out_texts(args.corpus):
        ids = tok.encode(text)[: args.window]
        if len(ids) < 16:
            continue
        recorder.__post_init__()
        logits = model.forward(torch.tensor(ids), model.new_cache(len(ids)))
        logp = torch.log_softmax(logits[:-1], -1)
        nll -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
        traces.append(recorder.trace())
    model.remove_route_observer(recorder)

    counts = sum(activation_counts(t, cfg.num_experts) for t in traces)
    reuse1 = np.mean([reuse_rate(t, 1) for t in traces], axis=0)
    reuse8 = np.mean([reuse_rate(t, 8) for t in traces], axis=0)
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    figures = {
        "documents": len(traces), "tokens": int(sum(len(t) for t in traces)),
        "perplexity": math.exp(nll / count),
        "top10pct_share": top_share(counts, 0.10).tolist(), "top25pct_share": top_share(counts, 0.25).tolist(),
        "never_used": (counts == 0).sum(axis=1).tolist(),
        "max_over_mean": (counts.max(axis=1) / counts.mean(axis=1)).tolist(),
        "reuse_next_token": reuse1.tolist(), "reuse_within_8": reuse8.tolist(),
        "uniform_reuse_next_token": k / E, "uniform_reuse_within_8": 1 - (1 - k / E) ** 8,
        "histogram": (counts / counts.sum(axis=1, keepdims=True)).round(4).tolist(),
    }
    samples = {}
    for prompt in PROMPTS:
        out, _ = generate(model, tok.encode(prompt), SamplingConfig(max_tokens=40))
        samples[prompt] = prompt + tok.decode(out, skip_special=True)
    figures["samples_greedy"] = samples

    print(f"Held-out: {figures['documents']} documents, {figures['tokens']} tokens, "
          f"perplexity {figures['perplexity']:.1f}\n")
    print("| layer | top 10% experts' share | top 25% share | max / mean | unused | reuse next token "
          "| reuse within 8 |")
    print("|---|---|---|---|---|---|---|")
    for layer in range(cfg.num_layers):
        print(f"| {layer} | {figures['top10pct_share'][layer]:.1%} | {figures['top25pct_share'][layer]:.1%} | "
              f"{figures['max_over_mean'][layer]:.1f} | {figures['never_used'][layer]} | "
              f"{reuse1[layer]:.1%} | {reuse8[layer]:.1%} |")
    print(f"\nUniform routing would give: top 10% share 10%, reuse next token {k / E:.1%}, "
          f"within 8 {1 - (1 - k / E) ** 8:.1%}.\n")
    print("Activation histogram (share of routed slots per expert, sorted, per layer; '#' = 1%):")
    for layer in range(cfg.num_layers):
        shares = np.sort(counts[layer] / counts[layer].sum())[::-1]
        print(f"  L{layer}: " + " ".join(f"{s * 100:.1f}" for s in shares[:12]) + " ...")
    for prompt, text in samples.items():
        print(f"\n--- {prompt!r} (greedy)\n{text}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
