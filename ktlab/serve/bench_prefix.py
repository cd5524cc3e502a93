"""``ktlab bench-prefix``: a shared-prefix workload through the engine with the prefix cache off,
in RAM, in RAM + disk, and after a restart over the same disk directory.

Every request is one shared prefix (a system prompt / few-shot header) plus its own tail; the first
request runs alone, the rest together. Each mode reports wall time, prompt tokens actually
prefilled, tokens served from the cache, page hits per tier, and whether its greedy outputs equal
the cache-off ones token for token.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig, page_bytes, pages_needed
from ktlab.serve.prefix import DiskTier, RamTier, TieredPrefixCache, model_fingerprint, scope_for

MODES = ("off", "ram", "ram+disk", "restart")


@dataclass(frozen=True)
class PrefixBenchConfig:
    """The workload and the cache budgets. ``ram_pages_disk_mode``: RAM pages in the RAM+disk mode
    (small on purpose, so most pages live on disk)."""

    model: str = "tiny"
    shared_tokens: int = 128
    tail_tokens: int = 8
    requests: int = 8
    max_tokens: int = 8
    page_size: int = 16
    ram_pages_disk_mode: int = 2
    disk_dir: str | None = None  # None: a temporary directory
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("shared_tokens", "tail_tokens", "requests", "max_tokens", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PrefixBenchConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.ram_pages_disk_mode, int) or self.ram_pages_disk_mode < 0:
            raise ValueError(f"PrefixBenchConfig.ram_pages_disk_mode must be >= 0, got {self.ram_pages_disk_mode!r}")


@dataclass
class ModeResult:
    """One mode's figures."""

    mode: str
    seconds: float
    prompt_tokens: int
    prefilled_tokens: int
    cached_tokens: int
    hits: dict[str, int] = field(default_factory=dict)
    equal_to_off: bool = True


def workload(config: PrefixBenchConfig, vocab: int) -> list[list[int]]:
    """``requests`` prompts: one shared prefix + a different tail each (random token ids)."""
    rng = np.random.default_rng(config.seed)
    head = rng.integers(3, vocab, size=config.shared_tokens).tolist()
    return [head + rng.integers(3, vocab, size=config.tail_tokens).tolist() for _ in range(config.requests)]


def run_prefix_bench(config: PrefixBenchConfig, model, model_path) -> list[ModeResult]:
    """Run every mode on ``model`` (loaded from ``model_path``, which names its cache scope)."""
    cfg = model.cfg
    prompts = workload(config, cfg.vocab_size)
    total = config.shared_tokens + config.tail_tokens + config.max_tokens
    if total > cfg.context_length:
        raise ValueError(f"shared + tail + max_tokens = {total} exceeds the context length {cfg.context_length}")
    dtype = str(model.dtype).removeprefix("torch.")
    pbytes = page_bytes(config.page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    scope = scope_for(model, model_fingerprint(model_path), config.page_size)
    engine_config = EngineConfig(max_batch_size=config.requests, max_tokens_in_batch=max(512, config.requests),
                                 kv=KVConfig(page_size=config.page_size,
                                             num_pages=config.requests * pages_needed(total, config.page_size)))
    sampling = SamplingConfig(max_tokens=config.max_tokens, temperature=0.0)
    all_pages = config.requests * pages_needed(total, config.page_size)
    with tempfile.TemporaryDirectory(prefix="ktlab-prefix-") as tmp:
        disk_dir = config.disk_dir or tmp

        def cache_for(mode: str) -> TieredPrefixCache | None:
            if mode == "off":
                return None
            if mode == "ram":
                return TieredPrefixCache([RamTier(all_pages * pbytes)], scope)
            ram = RamTier(config.ram_pages_disk_mode * pbytes)
            return TieredPrefixCache([ram, DiskTier(disk_dir, 4 * all_pages * pbytes, scope)], scope)

        results: list[ModeResult] = []
        reference: list[list[int]] | None = None
        for mode in MODES:
            cache = cache_for(mode)
            engine = Engine(model, None, engine_config, prefix_cache=cache).start()
            t0 = time.perf_counter()
            try:
                outs = [engine.submit(prompts[0], sampling, ignore_eos=True).result()]
                handles = [engine.submit(p, sampling, ignore_eos=True) for p in prompts[1:]]
                outs += [h.result() for h in handles]
                seconds = time.perf_counter() - t0
                metrics = engine.metrics()
            finally:
                engine.stop()  # RAM pages go down to disk: what "restart" finds
            ids = [o[0] for o in outs]
            reference = ids if reference is None else reference
            hits = {t.name: cache.stats.hits[t.name] for t in cache.tiers} if cache is not None else {}
            results.append(ModeResult(mode, seconds, sum(len(p) for p in prompts), int(metrics["prompt_tokens"]),
                                      sum(o[2].stats.cached_tokens for o in outs), hits, ids == reference))
    return results


def format_results(results: list[ModeResult]) -> str:
    """A plain table."""
    lines = [f"{'mode':<10} {'seconds':>8} {'prompt':>7} {'prefilled':>9} {'cached':>7}  {'equal':>5}  hits per tier"]
    for r in results:
        hits = ", ".join(f"{k} {v}" for k, v in r.hits.items()) or "-"
        lines.append(f"{r.mode:<10} {r.seconds:>8.3f} {r.prompt_tokens:>7} {r.prefilled_tokens:>9} "
                     f"{r.cached_tokens:>7}  {'yes' if r.equal_to_off else 'NO':>5}  {hits}")
    return "\n".join(lines)
