#!/usr/bin/env python3
"""Time to first token of a long prompt alone vs while 7 other requests decode (issue 6).

    python scripts/bench_ttft.py --model tiny --prompt-tokens 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ktlab.model import load_model
from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig


def time_to_first_token(engine: Engine, prompt: list[int]) -> float:
    """Seconds from submit to the first generated token."""
    start = time.perf_counter()
    handle = engine.submit(prompt, SamplingConfig(max_tokens=4))
    first = None
    for event in handle.events():
        if first is None and event.kind == "delta" and event.token_ids:
            first = time.perf_counter() - start
    return first if first is not None else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--decoders", type=int, default=7, help="requests decoding meanwhile")
    args = p.parse_args()
    model, tok = load_model(args.model)
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, model.cfg.vocab_size, size=args.prompt_tokens).tolist()
    engine = Engine(model, tok, EngineConfig(kv=KVConfig(num_pages=1024))).start()
    try:
        time_to_first_token(engine, prompt)  # warm-up
        alone = min(time_to_first_token(engine, prompt) for _ in range(3))
        others = [engine.submit(rng.integers(10, model.cfg.vocab_size, size=16).tolist(),
                                SamplingConfig(max_tokens=400), ignore_eos=True) for _ in range(args.decoders)]
        time.sleep(1.0)  # they are decoding now
        loaded = [time_to_first_token(engine, prompt) for _ in range(3)]
        for handle in others:
            handle.cancel()
        print(f"TTFT alone {alone * 1e3:.0f} ms; with {args.decoders} decoding "
              f"{[round(x * 1e3) for x in loaded]} ms; ratio {statistics.median(loaded) / alone:.2f} (median)")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
