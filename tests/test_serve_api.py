"""`ktlab serve` as a real server process on 127.0.0.1, driven by the official openai client and httpx."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

API_KEY = "test-key"
START_TIMEOUT = 90  # seconds for the server to load the model and answer /health
REQUEST_TIMEOUT = 60
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *extra: str, api_key: str | None = API_KEY) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ktlab", "serve", "--model", str(model), "--port", str(port), *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop by PID: SIGINT (uvicorn's graceful stop), then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def server(gguf_q8):
    # 24 pages of 16 = 384 positions: small enough to fill on purpose (the model's context is 256)
    proc, url = start_server(gguf_q8, "--kv-pages", "24", "--page-size", "16", "--max-batch-size", "16",
                             "--max-tokens-in-batch", "128", "--served-name", "tiny-test", "--bandwidth", "25",
                             "--paired-reads")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT, max_retries=0)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["ktlab_kv_pages_used"] == 0 and m["ktlab_running"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    m = metrics(server)
    assert m["ktlab_kv_pages_total"] == 24 and "ktlab_tokens_per_second" in m and "ktlab_queue_length" in m


def test_chat_non_streaming_and_streaming_agree(client):
    full = client.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=16, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and full.usage.completion_tokens >= 1
    extra = full.usage.model_dump()
    assert {"prefill_seconds", "decode_seconds", "prefill_tokens_per_second", "decode_tokens_per_second"} <= set(extra)
    stream = client.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason and usage.completion_tokens == full.usage.completion_tokens


def test_completions_streaming_and_not(client):
    full = client.completions.create(model="tiny-test", prompt="import numpy as np\n", max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens >= 1
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny-test", prompt="import numpy as np\n", max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text


def test_api_key_required(server):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": MESSAGES, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"messages": MESSAGES, "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
])
def test_malformed_requests_get_400(server, body, param):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + "/v1/chat/completions", content=data, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_openai_client_sees_400_for_oversize_prompt(client):
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny-test", prompt=[5] * 300, max_tokens=4)


@pytest.fixture(scope="module")
def long_server(gguf_q8_long):
    """A server whose requests may run for thousands of tokens (300 pages of 16): long enough to
    hang up on, or to queue behind, on hosts of any speed (the tiny model decodes a token in well
    under a millisecond on a fast one)."""
    proc, url = start_server(gguf_q8_long, "--kv-pages", "300", "--page-size", "16", "--served-name", "tiny-long")
    yield url
    stop_server(proc)


def test_disconnect_mid_stream_frees_pages_and_server_keeps_serving(long_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": MESSAGES, "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
    before = metrics(long_server)["ktlab_generated_tokens_total"]
    with httpx.stream("POST", long_server + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks in, then hang up
        assert any(line.startswith("data:") for line in got)
        assert metrics(long_server)["ktlab_kv_pages_used"] > 0
    m = wait_idle(long_server)
    assert m["ktlab_kv_pages_used"] == 0 and m["ktlab_running"] == 0
    assert m["ktlab_generated_tokens_total"] - before < 4000  # cut short, not run to its end
    client = openai.OpenAI(base_url=long_server + "/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT, max_retries=0)
    out = client.chat.completions.create(model="tiny-long", messages=MESSAGES, max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_request_waits_while_kv_pool_is_full(long_server):
    """The first request reserves 188 of the 300 pages (prompt + 3000 tokens); the second needs 126
    more: it queues (visible in /metrics) until the first ends, then completes."""
    client = openai.OpenAI(base_url=long_server + "/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT, max_retries=0)
    results = {}

    def run(name: str, prompt: list[int], max_tokens: int) -> None:
        results[name] = client.completions.create(model="tiny-long", prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0, extra_body={"ignore_eos": True})

    first = threading.Thread(target=run, args=("first", [5, 6, 7, 8], 3000))
    first.start()
    deadline = time.monotonic() + 30
    while metrics(long_server)["ktlab_kv_pages_used"] < 188 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second", [9, 10, 11, 12], 2000))
    second.start()
    seen_waiting = False
    while first.is_alive():
        m = metrics(long_server)
        seen_waiting |= m["ktlab_queue_length"] == 1 and m["ktlab_kv_pages_used"] == 188
        time.sleep(0.01)
    first.join(REQUEST_TIMEOUT)
    second.join(REQUEST_TIMEOUT)
    assert seen_waiting
    assert results["first"].usage.completion_tokens == 3000 and results["second"].usage.completion_tokens == 2000
    assert results["second"].usage.model_dump()["queue_seconds"] > 0.05
    assert wait_idle(long_server)["ktlab_kv_pages_used"] == 0


def test_load_32_requests_16_concurrent(server, client):
    done: dict[int, str] = {}

    def worker(i: int) -> None:
        for j in range(i, 32, 16):
            out = client.chat.completions.create(
                model="tiny-test", messages=[{"role": "user", "content": f"request {j}"}], max_tokens=6,
                temperature=0.7, seed=j, stream=j % 2 == 0)
            if j % 2 == 0:
                reasons = [c.choices[0].finish_reason for c in out if c.choices and c.choices[0].finish_reason]
                done[j] = reasons[-1]
            else:
                done[j] = out.choices[0].finish_reason

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT)
    assert time.monotonic() - t0 < REQUEST_TIMEOUT
    assert sorted(done) == list(range(32)) and set(done.values()) <= {"stop", "length"}
    m = wait_idle(server)
    assert m["ktlab_kv_pages_used"] == 0 and m["ktlab_queue_length"] == 0


def test_port_in_use_is_one_line_error(gguf_q8):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ktlab", "serve", "--model", str(gguf_q8), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=START_TIMEOUT)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_bench_serve_against_the_server(server):
    from ktlab.serve.bench import BenchConfig, format_report, run_bench

    time.sleep(0.6)  # paired reads sample at most every 0.5 s: one is due at the first decode step below
    report = run_bench(BenchConfig(api_url=server, model="tiny-test", prompt_lens=(8, 24), max_tokens=8,
                                   concurrent=2, requests=4, api_key=API_KEY))
    totals = report["totals"]
    assert totals["failed"] == 0, [r["error"] for r in report["requests"]]
    assert totals["requests"] == 4 and totals["usage_reported"]
    assert all(r["completion_tokens"] >= 1 and r["prefill_tps"] > 0 for r in report["requests"])
    assert report["requests"][1]["prompt_tokens"] > report["requests"][0]["prompt_tokens"]
    roofline = report["roofline"]  # the server's decode steps against the bandwidth-bound ideal
    assert roofline["bandwidth_gbs"] == pytest.approx(25) and roofline["decode_steps"] >= 1
    assert roofline["ideal_tps"] == pytest.approx(roofline["tokens_per_step"] * 25 / roofline["gb_per_step"])
    assert 0 < roofline["share_of_ideal"] == pytest.approx(roofline["measured_tps"] / roofline["ideal_tps"])
    paired = roofline["paired"]  # --paired-reads: sampled steps against a read of their own bytes
    assert paired["steps"] >= 1 and paired["share_of_ideal"] > 0
    assert paired["share_of_ideal"] == pytest.approx(paired["measured_tps"] / paired["ideal_tps"])
    text = format_report(report)
    assert "aggregate" in text and "bandwidth-bound ideal" in text and "paired reads" in text


def test_bench_serve_cli_json_and_unreachable(server):
    r = subprocess.run([sys.executable, "-m", "ktlab", "bench-serve", "--api-url", server, "--model", "tiny-test",
                        "--prompt-lens", "8", "--max-tokens", "4", "--concurrent", "2", "--api-key", API_KEY,
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=REQUEST_TIMEOUT)
    assert r.returncode == 0, r.stdout[-1500:]
    report = json.loads(r.stdout)
    assert report["totals"]["requests"] == 2 and len(report["results"]) == 2 and report["command"] == "bench-serve"
    r = subprocess.run([sys.executable, "-m", "ktlab", "bench-serve", "--api-url", f"http://127.0.0.1:{free_port()}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=REQUEST_TIMEOUT)
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_steady_decode_counts_only_stretches_with_all_requests_decoding():
    """bench-serve's steady rate against a brute-force timeline: random requests' token times,
    the active count checked at each token and integrated on a fine grid."""
    import numpy as np

    from ktlab.serve.bench import RequestResult, steady_decode

    rng = np.random.default_rng(7)
    results = []
    for i in range(6):
        first = rng.uniform(0, 1)
        times = np.sort(np.concatenate(([first], rng.uniform(first, first + rng.uniform(1, 3), size=50))))
        r = RequestResult(i, 8, token_times=times.tolist())
        r.first_token, r.last_token = times[0], times[-1]
        results.append(r)
    for concurrent in (1, 4, 6):
        tps, seconds = steady_decode(results, concurrent)

        def active(t: float) -> int:
            return sum(r.first_token < t <= r.last_token for r in results)

        tokens = sum(active(t) >= concurrent for r in results for t in r.token_times[1:])
        grid = np.linspace(0, 5, 500_001)
        ref_seconds = sum(active(t) >= concurrent for t in grid[::50]) * (grid[50] - grid[0])
        assert seconds == pytest.approx(ref_seconds, abs=0.01)
        assert tps == pytest.approx(tokens / seconds)
    assert steady_decode(results, 7) == (0.0, 0.0)  # never 7 at once
