"""Measured workloads the lab runs through the serving engine (``ktlab.serve``): batched decode and a
multi-turn chat over the three-tier prefix cache. Each builds its own :class:`Engine`, runs it in the
engine's thread, reports progress through a callback, and stops it; the numbers are *measured* on
this machine (experts on this CPU), never modeled. The serving modules are imported by the functions
that run them, so the configs here (which the dashboard's controls build) import no engine.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Progress = Callable[[int, int], None]  # (done, total)
MB = 1e6


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _engine(model, tokenizer, batch: int, context: int, page_size: int = 16, cache=None,
            bandwidth_gbs: float | None = None):
    """A started engine with room for ``batch`` sequences of ``context`` tokens (``cache``: a prefix
    cache; ``bandwidth_gbs``: the machine's read bandwidth, for the bandwidth-bound ideal)."""
    from ktlab.serve.engine import Engine, EngineConfig
    from ktlab.serve.kv import KVConfig, pages_needed

    kv = KVConfig(page_size=page_size, num_pages=batch * pages_needed(context, page_size))
    config = EngineConfig(max_batch_size=batch, max_tokens_in_batch=max(512, batch), kv=kv,
                          bandwidth_gbs=bandwidth_gbs)
    return Engine(model, tokenizer, config, prefix_cache=cache).start()


# ---- batched decode ----------------------------------------------------------------------------


def batched_decode_tok_s(model, prompts: Sequence[Sequence[int]], batches: Sequence[int], max_tokens: int = 24,
                         progress: Progress | None = None, timeout: float = 120.0,
                         bandwidth_gbs: float | None = None) -> list[dict]:
    """Aggregate decode tokens/s of ``b`` concurrent requests for each b in ``batches`` (prompts
    taken round-robin from ``prompts``; greedy, exactly ``max_tokens`` each): generated tokens after
    the first of every request over the longest decode time. Rows: batch, decode_tok_s, seconds;
    with ``bandwidth_gbs`` also ideal_tok_s (the engine's decode steps: their tokens / (the weight
    bytes they had to read / bandwidth)) and share_of_ideal (measured / ideal, over those steps)."""
    from ktlab.runtime.generate import SamplingConfig

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("batched_decode_tok_s needs non-empty prompts")
    for b in batches:
        _positive_int("batched_decode_tok_s", "batches[]", b)
    _positive_int("batched_decode_tok_s", "max_tokens", max_tokens)
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.0)
    context = max(len(p) for p in prompts) + max_tokens
    rows = []
    for i, b in enumerate(batches):
        engine = _engine(model, None, b, context, bandwidth_gbs=bandwidth_gbs)
        try:
            t0 = time.perf_counter()
            handles = [engine.submit(prompts[j % len(prompts)], sampling, ignore_eos=True) for j in range(b)]
            stats = [h.result(timeout)[2].stats for h in handles]
            seconds = time.perf_counter() - t0
        finally:
            engine.stop()
        decode_s = max(s.decode_seconds for s in stats)
        tokens = sum(s.completion_tokens - 1 for s in stats)
        row = {"batch": b, "decode_tok_s": tokens / decode_s if decode_s > 0 else 0.0, "seconds": seconds}
        metrics = engine.metrics()
        if "decode_ideal_tokens_per_second" in metrics:
            row.update(ideal_tok_s=metrics["decode_ideal_tokens_per_second"],
                       share_of_ideal=metrics["decode_share_of_ideal"])
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(batches))
    return rows


# ---- multi-turn chat over the prefix cache -------------------------------------------------------

SYSTEM = "You are a concise assistant. You answer questions about the Python standard library with short examples."
QUESTIONS = (
    "What does the pathlib module do?",
    "How do I read a file line by line?",
    "What is a generator?",
    "Explain list comprehensions.",
    "When should I use a dataclass?",
    "What does the json module provide?",
)


@dataclass(frozen=True)
class ChatCacheConfig:
    """Prefix-cache tiers (MB; 0 turns a tier off) and the chat workload: ``conversations`` users,
    each ``turns`` turns of one question and a reply of ``max_tokens``; turn t of every
    conversation is submitted together, so the cache sees concurrent, growing histories."""

    gpu_mb: float = 0.4
    ram_mb: float = 0.8
    disk_mb: float = 8.0
    page_size: int = 16
    conversations: int = 4
    turns: int = 3
    max_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("gpu_mb", "ram_mb", "disk_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"ChatCacheConfig.{name} must be a number of MB >= 0, got {value!r}")
        for name in ("page_size", "conversations", "turns", "max_tokens"):
            _positive_int("ChatCacheConfig", name, getattr(self, name))


@dataclass
class ChatCacheResult:
    """What the chat workload measured: page hits per tier (in tier order), per-turn prompt tokens
    and prompt tokens served from the cache (summed over conversations), and wall time."""

    tiers: list[str]
    hits: dict[str, int]
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    page_bytes: int = 0
    completed: bool = True  # False when stopped early

    @property
    def saved_tokens(self) -> int:
        """Prompt tokens not prefilled thanks to the cache."""
        return sum(self.cached_tokens)


def _tiers(config: ChatCacheConfig, scope, disk_dir: str) -> list:
    from ktlab.serve.prefix import DiskTier, GpuTier, RamTier

    tiers: list = []
    if config.gpu_mb > 0:
        tiers.append(GpuTier(int(config.gpu_mb * MB)))
    if config.ram_mb > 0:
        tiers.append(RamTier(int(config.ram_mb * MB)))
    if config.disk_mb > 0:
        tiers.append(DiskTier(disk_dir, int(config.disk_mb * MB), scope))
    return tiers


def chat_prefix_cache(model, tokenizer, model_path, config: ChatCacheConfig, progress: Progress | None = None,
                      should_stop: Callable[[], bool] = lambda: False, timeout: float = 120.0) -> ChatCacheResult:
    """Run the multi-turn chat workload on ``model`` (loaded from ``model_path``, which scopes the
    cache) with the tiers of ``config``."""
    from ktlab.runtime.generate import SamplingConfig
    from ktlab.serve.kv import page_bytes
    from ktlab.serve.prefix import TieredPrefixCache, model_fingerprint, scope_for

    cfg = model.cfg
    scope = scope_for(model, model_fingerprint(model_path), config.page_size)
    pbytes = page_bytes(config.page_size, cfg.num_layers, cfg.cache_heads, cfg.cache_head_dim,
                        str(model.dtype).removeprefix("torch."), cfg.mla)
    sampling = SamplingConfig(max_tokens=config.max_tokens, temperature=0.0)
    chats = [[{"role": "system", "content": SYSTEM}] for _ in range(config.conversations)]
    total = config.conversations * config.turns
    with tempfile.TemporaryDirectory(prefix="ktlab-lab-prefix-") as disk_dir:
        tiers = _tiers(config, scope, disk_dir)
        cache = TieredPrefixCache(tiers, scope) if tiers else None
        result = ChatCacheResult([t.name for t in tiers], {}, page_bytes=pbytes)
        engine = _engine(model, tokenizer, config.conversations, cfg.context_length, config.page_size, cache)
        t0 = time.perf_counter()
        try:
            for turn in range(config.turns):
                if should_stop():
                    result.completed = False
                    break
                handles = []
                for c, chat in enumerate(chats):
                    chat.append({"role": "user", "content": QUESTIONS[(c + turn) % len(QUESTIONS)]})
                    ids = tokenizer.encode(tokenizer.apply_chat_template(chat))
                    if len(ids) + config.max_tokens > cfg.context_length:
                        raise ValueError(f"turn {turn + 1} of the chat exceeds the context length "
                                         f"{cfg.context_length}: use fewer turns or a smaller max_tokens")
                    handles.append(engine.submit(ids, sampling))
                prompt, cached = 0, 0
                for c, (chat, handle) in enumerate(zip(chats, handles, strict=True)):
                    _, text, event = handle.result(timeout)
                    chat.append({"role": "assistant", "content": text})
                    prompt += event.stats.prompt_tokens
                    cached += event.stats.cached_tokens
                    if progress is not None:
                        progress(turn * config.conversations + c + 1, total)
                result.prompt_tokens.append(prompt)
                result.cached_tokens.append(cached)
        finally:
            engine.stop()
        result.seconds = time.perf_counter() - t0
        result.hits = {name: cache.stats.hits[name] for name in result.tiers} if cache is not None else {}
    return result
