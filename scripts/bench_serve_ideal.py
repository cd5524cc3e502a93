#!/usr/bin/env python3
"""Aggregate decode tok/s of the serving engine vs the bandwidth-bound ideal (issue 6).

A decode step of B sequences must read the distinct experts they select (with random routing
E * (1 - (1 - k/E)^B) per layer) plus the dense weights as the batched path stores them
(float32); the ideal is B tokens per (those bytes / the machine's read bandwidth).

    python scripts/bench_serve_ideal.py models/synthetic/qwen3moe-30b-a3b-4L-Q8_0.gguf --bandwidth 34.1
"""

from __future__ import annotations

import argparse

import numpy as np

from ktlab.model import load_model
from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig


def dense_float_bytes(cfg) -> int:
    """Bytes of the non-expert weights per step in float32 (attention, router, head)."""
    per_layer = cfg.attention_params + cfg.num_experts * cfg.hidden_size
    return 4 * (cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a GGUF file (e.g. the synthetic 30B-shape model)")
    p.add_argument("--bandwidth", type=float, default=34.1, help="read bandwidth GB/s (bench-experts measures it)")
    p.add_argument("--batches", default="1,8,16", help="concurrent requests to try")
    p.add_argument("--tokens", type=int, default=40, help="tokens generated per request")
    args = p.parse_args()
    model, tok = load_model(args.model)
    cfg = model.cfg
    expert_bytes = model.layers[0].moe.backends["cpu"].experts.expert_bytes
    engine = Engine(model, tok, EngineConfig(kv=KVConfig(num_pages=512))).start()
    rng = np.random.default_rng(0)
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            handles = [engine.submit(rng.integers(10, cfg.vocab_size, size=8).tolist(),
                                     SamplingConfig(max_tokens=args.tokens), ignore_eos=True) for _ in range(batch)]
            stats = [h.result()[2].stats for h in handles]
            measured = sum(s.completion_tokens - 1 for s in stats) / max(s.decode_seconds for s in stats)
            distinct = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch)
            step_bytes = cfg.num_layers * distinct * expert_bytes + dense_float_bytes(cfg)
            ideal = batch / (step_bytes / (args.bandwidth * 1e9))
            print(f"B={batch:2d}: measured {measured:6.1f} tok/s, ideal {ideal:6.1f} tok/s "
                  f"({step_bytes / 1e9:.2f} GB/step, {distinct:.0f} experts/layer) -> {measured / ideal:.0%}")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
