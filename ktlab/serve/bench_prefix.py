"""``ktlab bench-prefix``: shared-prefix workloads through the engine with the prefix cache off,
in RAM, in RAM + disk, and after a restart over the same disk directory.

Workloads: ``system-prompt`` (every request is one long shared system prompt plus its own short
question; the first runs alone, the rest together), ``few-shot`` (the same shape with a header of
``shots`` worked examples), ``multi-turn`` (one chat growing turn by turn: each turn's prompt is
the previous prompt, the model's reply and a new user message). Each mode reports wall time, time
to first token (the first request, and the mean of the others: those the cache can serve), prompt
tokens actually prefilled, tokens served from the cache, page hits per tier, and whether its greedy
outputs equal the cache-off ones token for token.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ktlab.config import check_positive_ints
from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, EngineConfig
from ktlab.serve.kv import KVConfig, page_bytes, pages_needed
from ktlab.serve.prefix import DiskTier, RamTier, TieredPrefixCache, model_fingerprint, scope_for

MODES = ("off", "ram", "ram+disk", "restart")
WORKLOADS = ("system-prompt", "few-shot", "multi-turn")


@dataclass(frozen=True)
class PrefixBenchConfig:
    """The workload and the cache budgets. ``ram_pages_disk_mode``: RAM pages in the RAM+disk mode
    (small on purpose, so most pages live on disk)."""

    model: str = "tiny"
    shared_tokens: int = 128  # system-prompt: its length; few-shot: tokens per shot; multi-turn: the system prompt
    tail_tokens: int = 8  # each request's own question (multi-turn: each user message)
    requests: int = 8  # multi-turn: turns
    max_tokens: int = 8
    page_size: int = 16
    ram_pages_disk_mode: int = 2
    disk_dir: str | None = None  # None: a temporary directory
    seed: int = 0
    workload: str = "system-prompt"
    shots: int = 4  # few-shot: examples in the header
    modes: tuple[str, ...] = MODES

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"PrefixBenchConfig.workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"PrefixBenchConfig.modes must be some of {', '.join(MODES)}, got {self.modes!r}")
        check_positive_ints(self, ("shared_tokens", "tail_tokens", "requests", "max_tokens", "page_size", "shots"))
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
    ttft_first: float = 0.0  # seconds from submit to the first token, first request (nothing cached yet)
    ttft_rest: float = 0.0  # the same, mean over the other requests (what the cache can serve)


def header_tokens(config: PrefixBenchConfig) -> int:
    """Tokens of the shared header: the system prompt, or the few-shot examples."""
    return config.shared_tokens * (config.shots if config.workload == "few-shot" else 1)


def max_prompt_tokens(config: PrefixBenchConfig) -> int:
    """The longest prompt the workload sends (multi-turn: the last turn, replies included)."""
    if config.workload == "multi-turn":
        return config.shared_tokens + config.requests * config.tail_tokens + (config.requests - 1) * config.max_tokens
    return header_tokens(config) + config.tail_tokens


def workload(config: PrefixBenchConfig, vocab: int) -> tuple[list[int], list[list[int]]]:
    """(shared header, one tail per request) as random token ids; multi-turn: the system prompt
    and each turn's user message (the turn's prompt also holds the earlier replies)."""
    rng = np.random.default_rng(config.seed)
    head = rng.integers(3, vocab, size=header_tokens(config)).tolist()
    return head, [rng.integers(3, vocab, size=config.tail_tokens).tolist() for _ in range(config.requests)]


def run_requests(engine: Engine, config: PrefixBenchConfig, vocab: int, sampling: SamplingConfig):
    """Send the workload; returns each request's (prompt, final result)."""
    head, tails = workload(config, vocab)
    if config.workload == "multi-turn":
        done, history = [], head
        for tail in tails:
            prompt = history + tail
            ids, text, event = engine.submit(prompt, sampling, ignore_eos=True).result()
            done.append((prompt, (ids, text, event)))
            history = prompt + ids
        return done
    prompts = [head + tail for tail in tails]
    first = engine.submit(prompts[0], sampling, ignore_eos=True).result()
    handles = [engine.submit(p, sampling, ignore_eos=True) for p in prompts[1:]]
    return [(prompts[0], first)] + [(p, h.result()) for p, h in zip(prompts[1:], handles, strict=True)]


def _ttft(stats) -> float:
    return stats.queue_seconds + stats.prefill_seconds


def run_prefix_bench(config: PrefixBenchConfig, model, model_path) -> list[ModeResult]:
    """Run the configured modes on ``model`` (loaded from ``model_path``, which names its cache scope)."""
    cfg = model.cfg
    total = max_prompt_tokens(config) + config.max_tokens
    if total > cfg.context_length:
        raise ValueError(f"the workload's longest request ({total} tokens with max_tokens) exceeds the context "
                         f"length {cfg.context_length}")
    dtype = str(model.dtype).removeprefix("torch.")
    pbytes = page_bytes(config.page_size, cfg.num_layers, cfg.cache_heads, cfg.cache_head_dim, dtype, cfg.mla)
    scope = scope_for(model, model_fingerprint(model_path), config.page_size)
    all_pages = config.requests * pages_needed(total, config.page_size)
    engine_config = EngineConfig(max_batch_size=config.requests, max_tokens_in_batch=max(512, config.requests),
                                 kv=KVConfig(page_size=config.page_size, num_pages=all_pages))
    sampling = SamplingConfig(max_tokens=config.max_tokens, temperature=0.0)
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
        for mode in config.modes:
            cache = cache_for(mode)
            engine = Engine(model, None, engine_config, prefix_cache=cache).start()
            t0 = time.perf_counter()
            try:
                done = run_requests(engine, config, cfg.vocab_size, sampling)
                seconds = time.perf_counter() - t0
                metrics = engine.metrics()
            finally:
                engine.stop()  # RAM pages go down to disk: what "restart" finds
            ids = [out[0] for _, out in done]
            stats = [out[2].stats for _, out in done]
            reference = ids if reference is None else reference
            hits = {t.name: cache.stats.hits[t.name] for t in cache.tiers} if cache is not None else {}
            rest = [_ttft(s) for s in stats[1:]]
            results.append(ModeResult(mode, seconds, sum(len(p) for p, _ in done), int(metrics["prompt_tokens"]),
                                      sum(s.cached_tokens for s in stats), hits, ids == reference,
                                      _ttft(stats[0]), sum(rest) / len(rest) if rest else 0.0))
    return results


def format_results(results: list[ModeResult]) -> str:
    """A plain table; TTFT of the later requests also as a share of the cache-off run's."""
    off = next((r for r in results if r.mode == "off"), None)
    lines = [f"{'mode':<10} {'seconds':>8} {'ttft 1st':>9} {'ttft rest':>9} {'vs off':>7} {'prompt':>7} "
             f"{'prefilled':>9} {'cached':>7}  {'equal':>5}  hits per tier"]
    for r in results:
        hits = ", ".join(f"{k} {v}" for k, v in r.hits.items()) or "-"
        share = f"{r.ttft_rest / off.ttft_rest:.0%}" if off is not None and off.ttft_rest > 0 else "-"
        lines.append(f"{r.mode:<10} {r.seconds:>8.3f} {r.ttft_first:>9.3f} {r.ttft_rest:>9.3f} {share:>7} "
                     f"{r.prompt_tokens:>7} {r.prefilled_tokens:>9} {r.cached_tokens:>7}  "
                     f"{'yes' if r.equal_to_off else 'NO':>5}  {hits}")
    return "\n".join(lines)
