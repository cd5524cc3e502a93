"""`ktlab serve --prefix-cache-ram/--prefix-cache-disk`: cached_tokens in usage, /metrics, restart."""

from __future__ import annotations

import httpx
import pytest
from test_serve_api import start_server, stop_server

PROMPT = list(range(5, 5 + 37))  # 37 token ids: 9 whole pages of 4, one token left to prefill


def complete(url: str, prompt: list[int]) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def prefix_metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("ktlab_prefix"):
            name, value = line.rsplit(" ", 1)
            tier = name.split('tier="')[1].split('"')[0] if "tier=" in name else None
            out[name.split("{")[0] + (f"/{tier}" if tier else "")] = float(value)
    return out


@pytest.mark.parametrize("bad", ["nogb", "/x:0", "/x:abc"])
def test_bad_disk_flag_is_one_line_error(gguf_q8, bad):
    with pytest.raises(RuntimeError, match="PATH:GB"):
        start_server(gguf_q8, "--prefix-cache-disk", bad, api_key=None)


def test_serve_prefix_cache_usage_metrics_and_restart(gguf_q8, tmp_path):
    flags = ("--page-size", "4", "--prefix-cache-ram", "0.001", "--prefix-cache-disk", f"{tmp_path}:0.01")
    proc, url = start_server(gguf_q8, *flags, api_key=None)
    try:
        first = complete(url, PROMPT)
        second = complete(url, PROMPT)
        m = prefix_metrics(url)
    finally:
        stop_server(proc)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 36}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert m["ktlab_prefix_hits_total/ram"] == 9 and m["ktlab_prefix_saved_tokens_total"] == 36
    assert m["ktlab_prefix_bytes/ram"] > 0 and "ktlab_prefix_bytes/disk" in m
    assert list(tmp_path.glob("*.kvpage"))  # the RAM pages went down to disk at shutdown
    proc, url = start_server(gguf_q8, *flags, api_key=None)
    try:
        again = complete(url, PROMPT)
        m = prefix_metrics(url)
    finally:
        stop_server(proc)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 36
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert m["ktlab_prefix_hits_total/disk"] >= 9 and m["ktlab_prefix_promotions_total"] >= 9
