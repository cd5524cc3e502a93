"""OpenAI-compatible HTTP API over the engine: FastAPI app, SSE streaming, Prometheus metrics.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. Request handlers never touch the model:
they tokenize, ``Engine.submit`` with a sink that hands events to the event loop, and read them
back from an asyncio queue. A client that goes away cancels its request (its pages are freed).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, Event, RequestStats

POLL_SECONDS = 0.5  # how often a waiting non-streaming handler checks that its client is still there


class BadRequest(Exception):
    """A request the API refuses (HTTP 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_response(exc: BadRequest) -> JSONResponse:
    """The OpenAI error body."""
    body = {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated completion request."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


# -- validation --------------------------------------------------------------------------------
def _get(body: dict[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise BadRequest(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _parse_common(body: dict[str, Any], prompt_ids: list[int], engine: Engine, default_max_tokens: int,
                  max_tokens_key: str = "max_tokens") -> ParsedRequest:
    max_tokens = _get(body, max_tokens_key, (int,), "an integer")
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens_key = "max_tokens"
        max_tokens = _get(body, "max_tokens", (int,), "an integer")
    room = engine.context_length - len(prompt_ids)
    if room < 1:
        raise BadRequest(f"the prompt has {len(prompt_ids)} tokens: the context length is {engine.context_length}",
                         param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, room))
    elif max_tokens <= 0:
        raise BadRequest(f"'{max_tokens_key}' must be >= 1, got {max_tokens}", param=max_tokens_key)
    temperature = _get(body, "temperature", (int, float), "a number")
    top_p = _get(body, "top_p", (int, float), "a number")
    top_k = _get(body, "top_k", (int,), "an integer")
    seed = _get(body, "seed", (int,), "an integer")
    n = _get(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported", param="n")
    if temperature is not None and not 0 <= temperature <= 2:
        raise BadRequest(f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    if top_k is not None and top_k < 0:
        raise BadRequest(f"'top_k' must be >= 0, got {top_k}", param="top_k")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of at most 4 strings", param="stop")
    stream = _get(body, "stream", (bool,), "a boolean") or False
    options = _get(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    sampling = SamplingConfig(
        max_tokens=max_tokens, temperature=float(temperature if temperature is not None else 1.0),
        top_k=top_k or 0, top_p=float(top_p if top_p is not None else 1.0), seed=seed,
    )
    try:
        engine.check(prompt_ids, sampling)
    except ValueError as exc:
        raise BadRequest(str(exc), param=max_tokens_key, code="context_length_exceeded") from None
    ignore_eos = _get(body, "ignore_eos", (bool,), "a boolean") or False  # vLLM's extension, for benchmarks
    return ParsedRequest(prompt_ids, sampling, stops, stream, include_usage, ignore_eos)


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_chat(body: dict[str, Any], engine: Engine, tokenizer, default_max_tokens: int) -> ParsedRequest:
    """Validate a chat completion body and render its messages with the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", param="messages")
        clean.append({"role": m["role"], "content": _message_text(m.get("content", ""), i)})
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from None
    return _parse_common(body, tokenizer.encode(text), engine, default_max_tokens, "max_completion_tokens")


def parse_completion(body: dict[str, Any], engine: Engine, tokenizer, default_max_tokens: int) -> ParsedRequest:
    """Validate a (legacy) completion body: ``prompt`` is a string or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise BadRequest("'prompt' must be a non-empty string or a list of token ids (one prompt)", param="prompt")
    if not ids:
        raise BadRequest("'prompt' is empty", param="prompt")
    return _parse_common(body, ids, engine, default_max_tokens)


def usage(stats: RequestStats | None) -> dict[str, Any]:
    """OpenAI ``usage`` plus prefill/decode times and speeds."""
    s = stats or RequestStats()
    return {
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
        "queue_seconds": round(s.queue_seconds, 6), "prefill_seconds": round(s.prefill_seconds, 6),
        "decode_seconds": round(s.decode_seconds, 6), "prefill_tokens_per_second": round(s.prefill_tps, 3),
        "decode_tokens_per_second": round(s.decode_tps, 3),
    }


def prometheus(metrics: dict[str, float], model_name: str, accelerator: str | None = None) -> str:
    """The engine's metrics as Prometheus text; ``accelerator``: the hybrid runtime's label
    (e.g. "simulated rtx4090-24g"), put on its lines."""
    spec = [
        ("queue_length", "gauge", "Requests waiting for admission"),
        ("running", "gauge", "Requests being generated"),
        ("kv_pages_used", "gauge", "KV cache pages held by requests"),
        ("kv_pages_total", "gauge", "KV cache pages in the pool"),
        ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s"),
        ("steps", "counter", "Batched model steps run"),
        ("prompt_tokens", "counter", "Prompt tokens prefilled"),
        ("generated_tokens", "counter", "Tokens generated"),
        ("finished_requests", "counter", "Requests finished (any reason)"),
        ("busy_seconds", "counter", "Seconds the engine spent in model steps and sampling"),
        ("decode_steps", "counter", "Decode-shaped steps (one token per sequence)"),
        ("decode_step_tokens", "counter", "Tokens of decode-shaped steps"),
        ("decode_step_bytes", "counter",
         "Weight bytes decode-shaped steps had to read (distinct experts selected + dense weights, as stored)"),
        ("decode_step_seconds", "counter", "Seconds of decode-shaped steps"),
        ("decode_step_ideal_seconds", "counter",
         "Seconds the decode-shaped steps' bytes take at the read bandwidth of their moment (the ideal)"),
        ("bandwidth_gbs", "gauge", "The read bandwidth the ideal assumed over the decode steps (GB/s)"),
        ("bandwidth_samples", "counter", "Read-bandwidth probes taken while decoding (ktlab serve --bandwidth auto)"),
        ("decode_tokens_per_second", "gauge", "Tokens per second of decode-shaped steps (measured)"),
        ("decode_ideal_tokens_per_second", "gauge",
         "Bandwidth-bound ideal of the same steps: their tokens / (their bytes / bandwidth)"),
        ("decode_share_of_ideal", "gauge", "Measured decode speed as a share of the bandwidth-bound ideal"),
        ("decode_paired_steps", "counter",
         "Decode steps whose weight bytes were read again right after (--paired-reads)"),
        ("decode_paired_tokens", "counter", "Tokens of the paired decode steps"),
        ("decode_paired_step_seconds", "counter", "Seconds of the paired decode steps"),
        ("decode_paired_read_seconds", "counter",
         "Seconds a pure read of the paired steps' own weight bytes took, right after each (their ideal)"),
        ("decode_paired_share", "gauge", "Paired steps' share of their ideal: read seconds / step seconds"),
    ]
    lines = []
    for key, kind, help_text in spec:
        if key not in metrics:  # the roofline lines need a bandwidth (--bandwidth), the paired ones --paired-reads
            continue
        name = f"ktlab_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} {kind}",
                  f'{name}{{model="{model_name}"}} {metrics[key]}']
    extra = _prefix_lines(metrics, model_name) + _hybrid_lines(metrics, model_name, accelerator or "unknown")
    return "\n".join(lines + extra) + "\n"


_PREFIX_SPEC = [  # (metrics key, or its prefix before _<tier>; kind; help)
    ("prefix_lookups", "counter", "Prefix cache lookups (one per admitted request)"),
    ("prefix_misses", "counter", "Prefix cache lookups that stopped at a page not cached"),
    ("prefix_saved_tokens", "counter", "Prompt tokens not prefilled thanks to the prefix cache"),
    ("prefix_promotions", "counter", "Prefix pages promoted from a slower tier to the fastest"),
    ("prefix_demotions", "counter", "Prefix pages demoted to a slower tier to make room"),
    ("prefix_drops", "counter", "Prefix pages evicted from the last tier (or that fit nowhere)"),
    ("prefix_hits", "counter", "Prefix cache page hits per tier"),
    ("prefix_bytes", "gauge", "Bytes of prefix pages held per tier"),
    ("prefix_capacity_bytes", "gauge", "Byte budget of each prefix cache tier"),
    ("prefix_pages", "gauge", "Prefix pages held per tier"),
]


def _prefix_lines(metrics: dict[str, float], model_name: str) -> list[str]:
    """Prometheus lines of the prefix cache (none when it is off); per-tier values get a tier label."""
    if "prefix_lookups" not in metrics:
        return []
    lines = []
    for key, kind, help_text in _PREFIX_SPEC:
        name = f"ktlab_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} {kind}"]
        if key in metrics:
            lines.append(f'{name}{{model="{model_name}"}} {metrics[key]}')
            continue
        for tier in ("gpu", "ram", "disk"):
            if f"{key}_{tier}" in metrics:
                lines.append(f'{name}{{model="{model_name}",tier="{tier}"}} {metrics[f"{key}_{tier}"]}')
    return lines


_HYBRID_SPEC = [  # (metrics key after hybrid_, kind, help); modeled_* are named by how they were modeled
    ("expert_lookups", "counter", "Expert lookups of hybrid steps, one per (token, layer, selected expert)"),
    ("expert_hits", "counter", "Expert lookups served by GPU-resident experts"),
    ("expert_hit_rate", "gauge", "Share of expert lookups served by GPU-resident experts"),
    ("expert_copies", "counter", "Experts copied over PCIe into the GPU expert cache"),
    ("steps", "counter", "Model steps run by the hybrid runtime"),
    ("tokens", "counter", "Tokens of those steps (prefill and decode)"),
    ("gpu_experts", "gauge", "Experts resident on the GPU now"),
    ("gpu_expert_slots", "gauge", "Experts the GPU budget holds"),
    ("modeled_seconds", "counter", "Modeled time of the hybrid steps"),
    ("modeled_tokens_per_second", "gauge", "Modeled tokens per second of the hybrid steps"),
    ("simulated", "gauge", "1 when the accelerator is simulated from a spec-sheet profile"),
]


def _hybrid_lines(metrics: dict[str, float], model_name: str, accelerator: str) -> list[str]:
    """Prometheus lines of the hybrid runtime (none when it is off), labeled with the accelerator.
    On a simulated accelerator every modeled number says so in its name, help and label."""
    if "hybrid_expert_lookups" not in metrics:
        return []
    simulated = bool(metrics.get("hybrid_simulated"))
    lines = []
    for key, kind, help_text in _HYBRID_SPEC:
        stem = key.replace("modeled", "simulated") if simulated else key
        name = f"ktlab_hybrid_{stem}" + ("_total" if kind == "counter" else "")
        if key.startswith("modeled"):
            help_text += f" ({accelerator}: from the cost model, not measured)"
        else:
            help_text += f" ({accelerator})"
        lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} {kind}",
                  f'{name}{{model="{model_name}",accelerator="{accelerator}"}} {metrics[f"hybrid_{key}"]}']
    return lines


class _Relay:
    """Hands engine events to the event loop with one wake-up per burst (a step emits one event per
    running request): fewer thread switches, so the engine thread waits less for the GIL."""

    def __init__(self) -> None:
        self._pending: deque[tuple[asyncio.Queue[Event], Event]] = deque()
        self._scheduled = False

    def sink_for(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
        """The engine-thread callback that delivers into ``events`` on ``loop`` (the app's one loop)."""

        def sink(event: Event) -> None:
            self._pending.append((events, event))
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon_threadsafe(self._flush)

        return sink

    def _flush(self) -> None:
        self._scheduled = False  # first: an event appended from now on schedules another flush
        while self._pending:
            events, event = self._pending.popleft()
            events.put_nowait(event)


SERVER_SWITCH_INTERVAL = 0.0005  # seconds (Python's default is 0.005)


# -- the app -----------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started) as ``model_name``."""
    app = FastAPI(title="ktlab", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    relay = _Relay()
    accelerator_label = engine.hybrid.accelerator.label if engine.hybrid is not None else None

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise BadRequest("invalid or missing API key (Authorization: Bearer KEY)", status=401,
                             code="invalid_api_key")

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(BadRequest(f"no route {request.method} {request.url.path}", status=404))

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(BadRequest(f"method {request.method} not allowed on {request.url.path}", status=405))

    async def read_body(request: Request) -> dict[str, Any]:
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = prometheus(engine.metrics(), model_name, accelerator_label)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "ktlab"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        parsed = parse_chat(body, engine, tokenizer, default_max_tokens)
        return await respond(request, parsed, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        parsed = parse_completion(body, engine, tokenizer, default_max_tokens)
        return await respond(request, parsed, chat=False)

    async def respond(request: Request, parsed: ParsedRequest, chat: bool):
        events: asyncio.Queue[Event] = asyncio.Queue()
        sink = relay.sink_for(asyncio.get_running_loop(), events)

        try:
            handle = engine.submit(parsed.prompt_ids, parsed.sampling, parsed.stop, sink=sink,
                                   ignore_eos=parsed.ignore_eos)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        now = int(time.time())
        if parsed.stream:
            return StreamingResponse(stream(handle, events, rid, now, chat, parsed.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return PlainTextResponse("", status_code=499)
                    continue
                text.append(event.text)
                if event.kind == "error":
                    raise BadRequest(event.error or "generation failed", status=500, kind="server_error")
                if event.kind == "done":
                    break
        except asyncio.CancelledError:
            handle.cancel()
            raise
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": model_name, "choices": [choice], "usage": usage(event.stats)}

    async def stream(handle, events: asyncio.Queue[Event], rid: str, now: int, chat: bool,
                     include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if piece is not None:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        # the per-token chunk, pre-rendered around its text (the hot path: one per token per stream)
        head, tail = chunk("\x00", None).split('"\\u0000"')

        def token_chunk(piece: str) -> str:
            return f"{head}{json.dumps(piece)}{tail}"

        finished = False
        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await events.get()
                if event.kind == "error":
                    finished = True
                    err = {"error": {"message": event.error, "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if event.kind == "done":
                    finished = True
                    if event.text:
                        yield chunk(event.text, None)
                    yield chunk(None, event.finish_reason)
                    if include_usage:
                        data = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [],
                                "usage": usage(event.stats)}
                        yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield token_chunk(event.text)  # one chunk per token, even while its text is held back
        finally:
            if not finished:  # the client went away (or the server stops): free the request's pages
                handle.cancel()

    return app


def check_bindable(host: str, port: int) -> None:
    """Raise OSError (one clear line) when ``host:port`` cannot be listened on."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_server(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted (quiet: warnings and errors only).

    The GIL switch interval drops from 5 to 0.5 ms for the process: the engine thread runs its
    kernels without the GIL and needs it back between calls, and while the event loop writes a
    step's SSE events it waited up to the full interval each time (decode +7-10% on the 30B shape).
    """
    import uvicorn

    sys.setswitchinterval(SERVER_SWITCH_INTERVAL)

    check_bindable(host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
