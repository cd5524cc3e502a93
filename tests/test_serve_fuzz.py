"""The HTTP API under hostile input: its published OpenAPI schema fuzzed with Schemathesis (valid and
invalid bodies, bounded in examples and time), hand-written edge cases, and the limits on the way in
(413 / 429 with OpenAI error bodies). A real server process on 127.0.0.1, stopped by its PID."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_serve_api import API_KEY, MESSAGES, start_server, stop_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FUZZ_EXAMPLES = 40  # per route and generation mode
BODY_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def fuzz_server(gguf_q8):
    proc, url = start_server(gguf_q8, "--served-name", "tiny-fuzz", "--default-max-tokens", "8",
                             "--max-body-bytes", str(BODY_LIMIT), "--max-prompt-tokens", "120")
    yield url
    stop_server(proc)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzzed_requests_get_an_openai_answer_never_a_500(fuzz_server, path, mode):
    """Schemathesis generates bodies from the published schema (valid ones, and ones that break it);
    every response conforms to the schema's status codes and content types, is never a server
    error, comes within a timeout (no hang), and every schema-breaking body is refused; refusals are
    OpenAI error bodies. (A schema-valid body may still be refused: its prompt may not fit the model's
    context or the server's limit, which no schema can say, so Schemathesis' positive-data check is off.)"""
    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    operation = schema.find_operation_by_path("POST", path)
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def run(case) -> None:
        response = case.call_and_validate(base_url=fuzz_server, headers=AUTH, timeout=60,
                                          excluded_checks=[positive_data_acceptance])
        seen.append(response.status_code)
        if response.status_code >= 400:
            err = response.json()["error"]
            assert err["message"] and err["type"] in ("invalid_request_error", "rate_limit_error")

    run()
    assert len(seen) >= FUZZ_EXAMPLES // 2
    assert (200 in seen) if mode is GenerationMode.POSITIVE else (400 in seen)


def test_openapi_schema_is_what_the_routes_validate(fuzz_server):
    spec = httpx.get(fuzz_server + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = spec["components"]["schemas"][ref]["properties"]
    assert {"messages", "max_tokens", "temperature", "stop", "stream", "n"} <= set(fields)
    assert {"400", "401", "413", "429"} <= set(chat["responses"])
    assert spec["components"]["schemas"]["ErrorResponse"]["properties"]["error"]


def post(url: str, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=60,
                      **kw)


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param and (code is None or err["code"] == code)
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": MESSAGES, "max_tokens": 10**12}, "max_tokens"),  # huge: over the context, no allocation
    ({"messages": MESSAGES, "n": 3}, "n"),
    ({"messages": MESSAGES, "stop": [1, 2]}, "stop"),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MESSAGES, "temperature": True}, "temperature"),
    ({"messages": MESSAGES, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_hand_written_bad_requests(fuzz_server, body, param):
    err = assert_error(post(fuzz_server, body), 400, param)
    assert param in err["message"] or err["code"] == "context_length_exceeded"
    if param == "n":
        assert err["message"] == "only n=1 is supported"


def test_unknown_fields_unicode_and_control_characters_are_served(fuzz_server):
    text = "naïve café 日本語 \U0001F600 \x00\x01\x1b[31m\u202e\ud7ff"
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3, "user": "me", "logprobs": False,
            "frequency_penalty": 0.5, "whatever": {"nested": [1, 2]}}
    r = post(fuzz_server, body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    r = post(fuzz_server, {"prompt": text, "max_tokens": 2}, path="/v1/completions")
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["text"], str)
    # a lone surrogate is valid JSON but no valid text: served or refused with a 400, never a 500
    lone = post(fuzz_server, b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}')
    assert lone.status_code == 200 or lone.status_code == 400 and lone.json()["error"]["param"] == "messages"


def test_body_over_the_limit_gets_413(fuzz_server):
    big = {"messages": [{"role": "user", "content": "x" * (10 << 20)}]}  # a 10 MB body
    assert_error(post(fuzz_server, big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the server counts as it reads
        for _ in range(4):
            yield b" " * BODY_LIMIT

    r = httpx.post(fuzz_server + "/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60)
    assert_error(r, 413, code="request_too_large")
    assert httpx.get(fuzz_server + "/health").status_code == 200


def test_prompt_over_the_limit_gets_413(fuzz_server):
    r = post(fuzz_server, {"prompt": [5] * 121, "max_tokens": 1}, path="/v1/completions")
    assert_error(r, 413, "prompt", "prompt_too_long")
    assert post(fuzz_server, {"prompt": [5] * 100, "max_tokens": 1}, path="/v1/completions").status_code == 200


def test_too_many_connections_and_a_full_queue_get_429():
    """One connection allowed: a second request while a long one streams gets 429 (Retry-After);
    a queue of one: with one request running and one waiting, a third gets 429 too. (The bundled
    tiny model: 900 tokens keep a request in flight for most of a second even on a fast host.)"""
    proc, url = start_server("tiny", "--served-name", "tiny-limits", "--max-connections", "1")
    try:
        long = {"messages": MESSAGES, "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect)
            first = next(lines)
            second = post(url, {"messages": MESSAGES, "max_tokens": 2})
            assert r.status_code == 200 and first.startswith("data:"), first
            assert_error(second, 429, code="too_many_requests")
            assert second.headers["retry-after"] == "1" and second.json()["error"]["type"] == "rate_limit_error"
    finally:
        stop_server(proc)
    proc, url = start_server("tiny", "--served-name", "tiny-queue", "--max-queue", "1", "--max-batch-size", "1")
    try:
        streams = []
        opened = threading.Barrier(3)

        def hold():
            with httpx.stream("POST", url + "/v1/chat/completions", json=long, headers=AUTH, timeout=120) as r:
                streams.append(r.status_code)
                opened.wait(60)
                for _ in r.iter_lines():
                    if len(streams) > 2:
                        break

        threads = [threading.Thread(target=hold) for _ in range(2)]  # one runs, one waits in the queue
        for t in threads:
            t.start()
        opened.wait(60)
        assert_error(post(url, {"messages": MESSAGES, "max_tokens": 2}), 429, code="queue_full")
        streams.append("done")
        for t in threads:
            t.join(120)
        assert streams[:2] == [200, 200]
    finally:
        stop_server(proc)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 2.0])
def test_sampler_is_defined_at_any_temperature(temperature):
    """Found by the fuzzer: logits / a subnormal temperature (0 in float32) gave NaN and
    torch.multinomial raised a 500. Now such temperatures are greedy, larger ones divide logits
    whose best is 0."""
    import torch

    from ktlab.runtime.generate import Sampler, SamplingConfig

    logits = torch.tensor([1.0, 3.0, -2.0, 2.9])
    sampler = Sampler(SamplingConfig(max_tokens=1, temperature=temperature, top_p=1e-9, seed=0))
    assert sampler(logits) == 1  # top_p that small keeps only the best
    draws = {Sampler(SamplingConfig(max_tokens=1, temperature=temperature, seed=s))(logits) for s in range(20)}
    assert draws <= {0, 1, 2, 3} and (draws == {1} if temperature < 1e-3 else len(draws) > 1)
