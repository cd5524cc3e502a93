"""Speed benchmark client for any OpenAI-compatible server (like the seed's test_speed.py).

Streams chat completions with built-in prompts of about the requested token lengths,
``concurrent`` at a time, and measures per request: time to first token (TTFT), prefill
tok/s = prompt tokens / TTFT, and decode tok/s = (completion tokens - 1) / (last - first token
time). Totals: wall time, output tok/s, the aggregate decode rate from the first request's
first token to the last one's last token, and the steady rate: over the stretches where
``concurrent`` requests all decode at once (the batched speed at that concurrency, without the
ramp-up while later prompts prefill). The client is one asyncio loop on aiohttp (as the seed's
test_speed.py): it shares the machine with the server it measures, so it must stay light.
Token counts come from the server's ``usage`` (``stream_options.include_usage``) when it sends one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, TextIO

import aiohttp

from ktlab.config import check_positive_ints
from ktlab.serve.roofline import effective_bandwidth, versus_ideal

WORDS_PER_TOKEN = 0.75  # English text in a byte-level BPE: about 4 tokens per 3 words


@dataclass(frozen=True)
class BenchConfig:
    """What ``run_bench`` sends: ``requests`` in all (default: max(len(prompt_lens), concurrent)),
    cycling through ``prompt_lens``, ``concurrent`` in flight at once."""

    api_url: str = "http://127.0.0.1:10002"
    model: str = "tiny"
    prompt_lens: tuple[int, ...] = (1024, 2048, 4096)
    max_tokens: int = 128
    concurrent: int = 1
    requests: int | None = None
    api_key: str | None = None
    timeout: float = 600.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.api_url.startswith(("http://", "https://")):
            raise ValueError(f"BenchConfig.api_url must start with http:// or https://, got {self.api_url!r}")
        if not self.prompt_lens or any(not isinstance(n, int) or n < 1 for n in self.prompt_lens):
            raise ValueError(f"BenchConfig.prompt_lens must be positive integers, got {self.prompt_lens!r}")
        check_positive_ints(self, ("max_tokens", "concurrent"))
        check_positive_ints(self, ("requests",), allow_none=True)
        if not self.timeout > 0:
            raise ValueError(f"BenchConfig.timeout must be > 0, got {self.timeout!r}")

    @property
    def n_requests(self) -> int:
        """Requests in all."""
        return self.requests if self.requests is not None else max(len(self.prompt_lens), self.concurrent)

    @property
    def base(self) -> str:
        """The URL up to and including /v1."""
        url = self.api_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


@dataclass
class RequestResult:
    """One request's measurements (seconds from the start of the benchmark)."""

    index: int
    target_prompt_len: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    start: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    error: str | None = None
    token_times: list[float] = field(default_factory=list, repr=False)  # each token chunk's arrival

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.first_token - self.start

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens / time to first token."""
        return self.prompt_tokens / self.ttft if self.ttft > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens after the first / time from first to last token."""
        span = self.last_token - self.first_token
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


def builtin_prompt(n_tokens: int, index: int = 0) -> str:
    """Text of about ``n_tokens`` tokens from the bundled Python-docs prompts (varied by ``index``
    so no two requests share a prefix)."""
    words = resources.files("ktlab").joinpath("data/prompts.txt").read_text(encoding="utf-8").split()
    n_words = max(1, round(n_tokens * WORDS_PER_TOKEN))
    start = (index * 37) % len(words)
    picked = [words[(start + i) % len(words)] for i in range(n_words)]
    return f"[{index}] " + " ".join(picked)


def _chunk_piece(choice: dict[str, Any]) -> str | None:
    """A streamed choice's token text (chat delta content, completion text, or reasoning), or None."""
    delta = choice.get("delta") or {}
    piece = delta.get("content", choice.get("text"))
    if piece is None:
        piece = delta.get("reasoning_content")
    # a token's chunk: any content, except the empty one that only announces the role
    return piece if piece is not None and (piece or "role" not in delta) else None


async def _one(config: BenchConfig, session: aiohttp.ClientSession, index: int, t0: float) -> RequestResult:
    target = config.prompt_lens[index % len(config.prompt_lens)]
    result = RequestResult(index, target)
    body = {
        "model": config.model, "messages": [{"role": "user", "content": builtin_prompt(target, index)}],
        "max_tokens": config.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:  # vLLM/SGLang/ktlab extension: always generate max_tokens
        body["ignore_eos"] = True
    result.start = time.perf_counter() - t0
    times = result.token_times
    try:
        async with session.post(f"{config.base}/chat/completions", json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]["message"]
                result.error = f"HTTP {response.status}: {text[:200]}"
                return result
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
                    result.completion_tokens = int(chunk["usage"].get("completion_tokens", 0))
                    result.usage_reported = True
                for choice in chunk.get("choices") or []:
                    if _chunk_piece(choice) is not None:
                        times.append(time.perf_counter() - t0)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: bad JSON, a line too long
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if times:
        result.first_token, result.last_token = times[0], times[-1]
    if not result.usage_reported:  # estimate: one content chunk per token, words -> tokens
        result.completion_tokens = len(times)
        result.prompt_tokens = target
    if not times and result.completion_tokens == 0:
        result.error = "no tokens received"
    return result


def run_bench(config: BenchConfig, progress: TextIO | None = None) -> dict[str, Any]:
    """Run the benchmark; returns {config, requests: [...], totals: {...}} (and ``roofline`` when
    the server is ktlab's with a bandwidth). Safe to call from a notebook (whose event loop is
    running): the client then runs on its own thread.

    Raises OSError (one clear line) when the server cannot be reached at all.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_bench(config, progress))
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _bench(config, progress)).result()


async def _bench(config: BenchConfig, progress: TextIO | None) -> dict[str, Any]:
    """The benchmark on one event loop: one task per request, ``concurrent`` in flight at once
    (a light client: it shares the machine with the server it measures)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=config.timeout, connect=10.0)
    connector = aiohttp.TCPConnector(limit=config.concurrent + 2)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        try:
            async with session.get(f"{config.base}/models") as response:
                if response.status != 200:
                    raise OSError(f"{config.base}/models answered HTTP {response.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise OSError(f"cannot reach {config.api_url}: {exc or type(exc).__name__}") from None
        before = await server_roofline(session, config)
        slots = asyncio.Semaphore(config.concurrent)
        t0 = time.perf_counter()

        async def task(i: int) -> RequestResult:
            async with slots:
                r = await _one(config, session, i, t0)
            if progress is not None:
                line = (f"request {i}: error: {r.error}" if r.error else
                        f"request {i}: prompt {r.prompt_tokens} tok, ttft {r.ttft:.2f} s, prefill "
                        f"{r.prefill_tps:.1f} tok/s | {r.completion_tokens} tok, decode {r.decode_tps:.1f} tok/s")
                print(line, file=progress, flush=True)
            return r

        results = await asyncio.gather(*(task(i) for i in range(config.n_requests)))
        wall = time.perf_counter() - t0
        roofline = roofline_delta(before, await server_roofline(session, config))
    report = {"config": asdict(config), "requests": [_row(r) for r in results],
              "totals": _totals(results, wall, config.concurrent)}
    if roofline is not None:
        report["roofline"] = roofline
    return report


_ROOFLINE_COUNTERS = ("decode_step_tokens", "decode_step_bytes", "decode_step_seconds", "decode_steps")
_PAIRED_COUNTERS = ("decode_paired_steps", "decode_paired_tokens", "decode_paired_step_seconds",
                    "decode_paired_read_seconds")


async def server_roofline(session: aiohttp.ClientSession, config: BenchConfig) -> dict[str, float] | None:
    """The ktlab server's decode-step counters and bandwidth from /metrics (None for servers
    without them: other engines, or ``ktlab serve --bandwidth off``)."""
    try:
        async with session.get(config.base.removesuffix("/v1") + "/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ktlab_"):
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{")[0].removeprefix("ktlab_").removesuffix("_total")
        if key in (*_ROOFLINE_COUNTERS, *_PAIRED_COUNTERS, "bandwidth_gbs", "decode_step_ideal_seconds"):
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    return values if all(k in values for k in (*_ROOFLINE_COUNTERS, "bandwidth_gbs")) else None


def roofline_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """The benchmark's decode steps against the bandwidth-bound ideal: measured tok/s, ideal tok/s
    = tokens / (bytes read / bandwidth), and their ratio (None without the server's counters)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in _ROOFLINE_COUNTERS}
    if d["decode_steps"] <= 0 or d["decode_step_seconds"] <= 0:
        return None
    # A server that tracks its bandwidth counts the ideal's seconds (each step at the bandwidth of
    # its moment); else the run's bytes at the bandwidth it reports.
    ideal_s = (after["decode_step_ideal_seconds"] - before["decode_step_ideal_seconds"]
               if "decode_step_ideal_seconds" in before and "decode_step_ideal_seconds" in after
               else d["decode_step_bytes"] / (after["bandwidth_gbs"] * 1e9))
    delta = {
        "bandwidth_gbs": effective_bandwidth(d["decode_step_bytes"], ideal_s, after["bandwidth_gbs"]),
        "decode_steps": d["decode_steps"],
        "tokens_per_step": d["decode_step_tokens"] / d["decode_steps"],
        "gb_per_step": d["decode_step_bytes"] / d["decode_steps"] / 1e9,
        **versus_ideal(d["decode_step_tokens"], ideal_s, d["decode_step_seconds"]),
    }
    if all(k in before and k in after for k in _PAIRED_COUNTERS):  # ktlab serve --paired-reads
        p = {k.removeprefix("decode_paired_"): after[k] - before[k] for k in _PAIRED_COUNTERS}
        if p["steps"] > 0 and p["step_seconds"] > 0:
            delta["paired"] = {"steps": p["steps"], **versus_ideal(p["tokens"], p["read_seconds"], p["step_seconds"])}
    return delta


def _row(r: RequestResult) -> dict[str, Any]:
    row = asdict(r)
    del row["token_times"]
    row.update(ttft=r.ttft, prefill_tps=r.prefill_tps, decode_tps=r.decode_tps)
    return row


def steady_decode(results: list[RequestResult], concurrent: int) -> tuple[float, float]:
    """(aggregate decode tok/s, seconds) over the stretches where ``concurrent`` requests were all
    decoding at once (each between its first and last token): the batched rate at that
    concurrency, without the ramp-up and tail where fewer run (which grow with shorter
    outputs and longer prompts). (0, 0) when no stretch had that many."""
    edges = sorted([(r.first_token, 1) for r in results] + [(r.last_token, -1) for r in results],
                   key=lambda e: (e[0], e[1]))  # a request ending at t leaves before one starting at t joins
    windows: list[tuple[float, float]] = []
    active = 0
    for i, (t, step) in enumerate(edges[:-1]):
        active += step
        if active >= concurrent and edges[i + 1][0] > t:
            windows.append((t, edges[i + 1][0]))
    seconds = sum(b - a for a, b in windows)
    if seconds <= 0:
        return 0.0, 0.0
    starts = [a for a, _ in windows]
    tokens = 0
    for r in results:
        for t in r.token_times[1:]:  # a request's first token is its prefill's, not a decode token
            i = bisect.bisect_left(starts, t) - 1  # the window starting before t: is t in (a, b]?
            if i >= 0 and t <= windows[i][1]:
                tokens += 1
    return tokens / seconds, seconds


def _totals(results: list[RequestResult], wall: float, concurrent: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    decode_tokens = sum(max(r.completion_tokens - 1, 0) for r in ok)
    span = (max(r.last_token for r in ok) - min(r.first_token for r in ok)) if ok else 0.0
    steady_tps, steady_s = steady_decode([r for r in ok if r.token_times], min(concurrent, len(ok)))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_seconds": wall,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "completion_tokens": sum(r.completion_tokens for r in ok),
        "output_tps": sum(r.completion_tokens for r in ok) / wall if wall > 0 else 0.0,
        "aggregate_decode_tps": decode_tokens / span if span > 0 else 0.0,
        "steady_decode_tps": steady_tps, "steady_seconds": steady_s, "decode_span_seconds": span,
        "mean_ttft": mean([r.ttft for r in ok]), "mean_prefill_tps": mean([r.prefill_tps for r in ok]),
        "mean_decode_tps": mean([r.decode_tps for r in ok]),
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
    }


def format_report(report: dict[str, Any]) -> str:
    """A table of the requests and the totals."""
    lines = [f"{'req':>4} {'prompt':>7} {'ttft s':>8} {'prefill tok/s':>14} {'gen':>5} {'decode tok/s':>13}"]
    for r in report["requests"]:
        if r["error"]:
            lines.append(f"{r['index']:>4} error: {r['error']}")
            continue
        lines.append(f"{r['index']:>4} {r['prompt_tokens']:>7} {r['ttft']:>8.3f} {r['prefill_tps']:>14.1f} "
                     f"{r['completion_tokens']:>5} {r['decode_tps']:>13.1f}")
    t, c = report["totals"], report["config"]
    note = "" if t["usage_reported"] else " (token counts estimated: the server sent no usage)"
    lines += [
        "",
        f"{t['requests'] - t['failed']}/{t['requests']} requests ok, {c['concurrent']} concurrent, "
        f"{t['wall_seconds']:.2f} s{note}",
        f"prefill: mean {t['mean_prefill_tps']:.1f} tok/s per request, mean TTFT {t['mean_ttft']:.3f} s",
        f"decode: mean {t['mean_decode_tps']:.1f} tok/s per request, aggregate {t['aggregate_decode_tps']:.1f} tok/s "
        f"(first to last token of all, {t['decode_span_seconds']:.2f} s); with all "
        f"{min(c['concurrent'], t['requests'])} decoding: {t['steady_decode_tps']:.1f} tok/s "
        f"({t['steady_seconds']:.2f} s)",
        f"output: {t['completion_tokens']} tokens, {t['output_tps']:.1f} tok/s over the wall time",
    ]
    r = report.get("roofline")
    if r is not None:
        lines.append(
            f"bandwidth-bound ideal (server's {r['decode_steps']:.0f} decode steps, {r['tokens_per_step']:.1f} tokens "
            f"and {r['gb_per_step']:.3f} GB of weights per step at {r['bandwidth_gbs']:.1f} GB/s): measured "
            f"{r['measured_tps']:.1f} tok/s, ideal {r['ideal_tps']:.1f} tok/s -> {r['share_of_ideal']:.0%}")
        p = r.get("paired")
        if p is not None:
            lines.append(f"paired reads ({p['steps']:.0f} sampled steps, each timed against a read of its own weight "
                         f"bytes right after): measured {p['measured_tps']:.1f} tok/s, ideal {p['ideal_tps']:.1f} "
                         f"tok/s -> {p['share_of_ideal']:.0%}")
    return "\n".join(lines)
