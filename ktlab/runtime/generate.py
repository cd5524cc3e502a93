"""Single-request generation: chunked prefill, then one token at a time with sampling."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"SamplingConfig.max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationStats:
    """Token counts and wall times of one generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Generated tokens per second after the first (the first comes from the prefill)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


#: Temperatures below this sample greedily (float32 cannot divide by them without overflow).
GREEDY_BELOW = 1e-6


@dataclass
class Sampler:
    """Picks tokens from logits according to a ``SamplingConfig`` (seeded, reproducible)."""

    config: SamplingConfig
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(self.config.seed if self.config.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token id from logits [V]."""
        cfg = self.config
        if cfg.temperature < GREEDY_BELOW:  # 0, or so small that float32 logits / it is inf or 0 / 0
            return int(torch.argmax(logits))
        logits = logits.float()
        logits = (logits - logits.max()) / cfg.temperature  # the best is 0: no inf - inf at tiny temperatures
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < cfg.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def generate_stream(
    model, prompt_ids: Sequence[int], sampling: SamplingConfig, stop_ids: Sequence[int] = (),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one; ``stats`` (if given) is filled in as it goes."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    capacity = len(prompt_ids) + sampling.max_tokens
    if capacity > model.cfg.context_length:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the context "
            f"length {model.cfg.context_length}"
        )
    if sampling.max_tokens == 0:
        return
    sample = Sampler(sampling)
    cache = model.new_cache(capacity)
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
    t0 = time.perf_counter()
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = model.forward(prompt[start : start + PREFILL_CHUNK], cache, last_only=True)
    stats.prefill_seconds = time.perf_counter() - t0
    stop = set(stop_ids)
    t1 = time.perf_counter()
    for i in range(sampling.max_tokens):
        token = sample(logits[-1])
        stats.generated_tokens += 1
        stats.decode_seconds = time.perf_counter() - t1
        yield token
        if token in stop:
            stats.finish_reason = "stop"
            return
        if i + 1 < sampling.max_tokens:
            logits = model.forward(torch.tensor([token], dtype=torch.long), cache)
    stats.decode_seconds = time.perf_counter() - t1


def generate(
    model, prompt_ids: Sequence[int], sampling: SamplingConfig, stop_ids: Sequence[int] = ()
) -> tuple[list[int], GenerationStats]:
    """All generated token ids (stop token included) and the stats."""
    stats = GenerationStats()
    ids = list(generate_stream(model, prompt_ids, sampling, stop_ids, stats))
    return ids, stats
