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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktlab import __version__
from ktlab.runtime.generate import SamplingConfig
from ktlab.serve.engine import Engine, Event, RequestStats
from ktlab.serve.limits import InboundLimits
from ktlab.serve.schema import (
    COMPLETION_RESPONSES,
    ERROR_RESPONSES,
    FIELD_NAMES,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    ServeLimits,
    TextPart,
)

DEFAULT_LIMITS = ServeLimits()
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


# -- validation (types and ranges by the pydantic models of ktlab.serve.schema) ----------------
def _parse_common(req: SamplingFields, prompt_ids: list[int], engine: Engine, default_max_tokens: int,
                  limits: ServeLimits, max_tokens_key: str = "max_tokens") -> ParsedRequest:
    max_tokens = getattr(req, max_tokens_key)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens_key, max_tokens = "max_tokens", req.max_tokens
    where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
        raise BadRequest(f"the prompt has {len(prompt_ids)} tokens: this server takes at most "
                         f"{limits.max_prompt_tokens}", param=where, status=413, code="prompt_too_long")
    room = engine.context_length - len(prompt_ids)
    if room < 1:
        raise BadRequest(f"the prompt has {len(prompt_ids)} tokens: the context length is {engine.context_length}",
                         param=where, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, room))
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    include_usage = req.stream_options.include_usage if req.stream_options is not None else False
    sampling = SamplingConfig(
        max_tokens=max_tokens, temperature=float(req.temperature if req.temperature is not None else 1.0),
        top_k=req.top_k or 0, top_p=float(req.top_p if req.top_p is not None else 1.0), seed=req.seed,
    )
    try:
        engine.check(prompt_ids, sampling)
    except ValueError as exc:
        raise BadRequest(str(exc), param=max_tokens_key, code="context_length_exceeded") from None
    return ParsedRequest(prompt_ids, sampling, stops, bool(req.stream), include_usage, bool(req.ignore_eos))


def _encode(tokenizer, text: str, param: str) -> list[int]:
    """Token ids of ``text``; a string that is not valid Unicode (a lone surrogate from a JSON
    escape) is the client's error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"'{param}' is not valid Unicode text ({exc.reason} at position {exc.start})",
                         param=param) from None
    return tokenizer.encode(text)


def _message_text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def parse_chat(req: ChatCompletionRequest, engine: Engine, tokenizer, default_max_tokens: int,
               limits: ServeLimits = DEFAULT_LIMITS) -> ParsedRequest:
    """Render a validated chat request's messages with the model's chat template."""
    clean = [{"role": m.role, "content": _message_text(m.content)} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from None
    return _parse_common(req, _encode(tokenizer, text, "messages"), engine, default_max_tokens, limits,
                         "max_completion_tokens")


def parse_completion(req: CompletionRequest, engine: Engine, tokenizer, default_max_tokens: int,
                     limits: ServeLimits = DEFAULT_LIMITS) -> ParsedRequest:
    """A validated (legacy) completion request: ``prompt`` is a string or a list of token ids."""
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = _encode(tokenizer, prompt, "prompt") if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise BadRequest("'prompt' is empty", param="prompt")
    return _parse_common(req, ids, engine, default_max_tokens, limits)


def validation_error(exc: RequestValidationError) -> BadRequest:
    """The first of pydantic's complaints as one OpenAI error (``param``: the top-level field)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return BadRequest(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if not loc:
        return BadRequest(f"the request body must be a JSON object ({first['msg']})")
    path = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:] if p.isdigit() or p in FIELD_NAMES)
    if first.get("type") == "less_than_equal" and loc[0] == "n":
        return BadRequest("only n=1 is supported", param="n")
    return BadRequest(f"'{path}': {first['msg']}", param=loc[0])


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
               default_max_tokens: int = 256, limits: ServeLimits = DEFAULT_LIMITS) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started) as ``model_name``; ``GET /openapi.json``
    publishes the request models the routes validate."""
    app = FastAPI(title="ktlab", version=__version__, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible completions over a hybrid CPU+GPU MoE engine.")
    app.add_middleware(InboundLimits, limits=limits)
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            authorize(request)  # a client without the key learns nothing about the body's schema
        except BadRequest as denied:
            return error_response(denied)
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:  # e.g. a body the framework cannot parse
            message = f"{exc.detail} ({request.method} {request.url.path})"
        return error_response(BadRequest(message, status=exc.status_code))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = prometheus(engine.metrics(), model_name, accelerator_label)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "ktlab"}]}

    @app.post("/v1/chat/completions", responses={**COMPLETION_RESPONSES, **ERROR_RESPONSES})
    async def chat(request: Request, body: ChatCompletionRequest):
        authorize(request)
        parsed = parse_chat(body, engine, tokenizer, default_max_tokens, limits)
        return await respond(request, parsed, chat=True)

    @app.post("/v1/completions", responses={**COMPLETION_RESPONSES, **ERROR_RESPONSES})
    async def completions(request: Request, body: CompletionRequest):
        authorize(request)
        parsed = parse_completion(body, engine, tokenizer, default_max_tokens, limits)
        return await respond(request, parsed, chat=False)

    async def respond(request: Request, parsed: ParsedRequest, chat: bool):
        events: asyncio.Queue[Event] = asyncio.Queue()
        sink = relay.sink_for(asyncio.get_running_loop(), events)

        if engine.metrics()["queue_length"] >= limits.max_queue:
            raise BadRequest(f"the server's queue is full ({limits.max_queue} requests waiting): retry later",
                             status=429, kind="rate_limit_error", code="queue_full")
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
