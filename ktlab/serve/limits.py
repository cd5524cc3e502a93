"""Limits on the way in, as ASGI middleware: the request body's size (413) and the /v1 requests
in flight at once (429), each refused with an OpenAI error body before the app sees the request.
The queue-length and prompt-length limits need the engine and the tokenizer: :mod:`ktlab.serve.api`
applies them."""

from __future__ import annotations

import json

from ktlab.serve.schema import ServeLimits


async def _send_error(send, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class InboundLimits:
    """ASGI middleware enforcing ``limits.max_body_bytes`` on every request (read ahead, at most
    that many bytes held, then replayed to the app) and ``limits.max_connections`` on /v1 routes."""

    def __init__(self, app, limits: ServeLimits) -> None:
        self.app, self.limits = app, limits
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, f"the request body has {int(declared)} bytes: this server takes at most "
                              f"{limit}", "invalid_request_error", "request_too_large")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await _send_error(send, 413, f"the request body is over this server's limit of {limit} bytes",
                                  "invalid_request_error", "request_too_large")
                return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response waits for

        counted = scope["path"].startswith("/v1/")
        if counted and self.in_flight >= self.limits.max_connections:
            await _send_error(send, 429, f"too many requests at once ({self.limits.max_connections} in flight): "
                              "retry later", "rate_limit_error", "too_many_requests")
            return
        self.in_flight += counted
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= counted
