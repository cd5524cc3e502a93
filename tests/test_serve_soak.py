"""A bounded soak of `ktlab serve`: 16 concurrent clients for about a minute (KTLAB_SOAK_SECONDS),
random prompt and answer lengths, streaming or not, and random hang-ups mid-stream. Afterwards
every KV page is free, nothing runs or waits, the server's RSS grew less than a named bound, and
every request got an answer or was cleanly cancelled by its client (never a 5xx, never a hang)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import httpx
import pytest
from test_serve_api import API_KEY, metrics, start_server, stop_server, wait_idle

SOAK_SECONDS = float(os.environ.get("KTLAB_SOAK_SECONDS", "50"))
CLIENTS = 16
RSS_GROWTH_BOUND_MB = 150  # after warm-up: allocator caches may grow, a leak per request would not stay under it
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "experts", "route",
         "tokens", "to", "caches"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_request(url: str, rng: random.Random, outcomes: Counter) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(1, 160),
            "temperature": rng.choice([0, 0.7, 1.3]), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.6:
        body["stream"] = True
        hang_up_after = rng.randint(1, 40) if rng.random() < 0.4 else None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            for i, line in enumerate(lines):
                if hang_up_after is not None and i >= hang_up_after:
                    outcomes["cancelled"] += 1  # leaving the block closes the connection
                    return
                if line == "data: [DONE]":
                    outcomes["streamed"] += 1
                    return
            raise AssertionError("stream ended without [DONE]")
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    outcomes["answered"] += 1


@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_soak_leaves_no_pages_no_requests_and_bounded_memory(gguf_q8_long):
    proc, url = start_server(gguf_q8_long, "--served-name", "tiny-soak", "--kv-pages", "400", "--page-size", "16",
                             "--max-batch-size", "8")
    try:
        warm = random.Random(-1)
        for _ in range(8):  # warm-up: allocator and code paths, before the baseline
            one_request(url, warm, Counter())
        wait_idle(url)
        before_mb = rss_mb(proc.pid)
        outcomes: Counter = Counter()
        failures: list[BaseException] = []
        deadline = time.monotonic() + SOAK_SECONDS

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline and not failures:
                try:
                    one_request(url, rng, outcomes)
                except BaseException as exc:  # noqa: BLE001 - reported below, with the request's seed
                    failures.append(exc)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOAK_SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not failures, repr(failures[:3])
        m = wait_idle(url)
        assert m["ktlab_kv_pages_used"] == 0 and m["ktlab_running"] == 0 and m["ktlab_queue_length"] == 0
        total = sum(outcomes.values())
        assert total >= CLIENTS and outcomes["cancelled"] and outcomes["streamed"] and outcomes["answered"]
        assert m["ktlab_finished_requests_total"] >= total  # every request ended on the server too
        grown = rss_mb(proc.pid) - before_mb
        assert grown < RSS_GROWTH_BOUND_MB, f"RSS grew {grown:.0f} MB over {total} requests"
        print(f"soak: {total} requests in {SOAK_SECONDS:.0f} s ({dict(outcomes)}), RSS {grown:+.0f} MB, "
              f"{metrics(url)['ktlab_generated_tokens_total']:.0f} tokens")
    finally:
        stop_server(proc)
