"""The HTTP API's request and error models (pydantic): what the routes validate is what
``GET /openapi.json`` publishes, so clients, code generators and fuzzers read the same contract.

Types are strict (a string is never coerced to a number, nor a number to a boolean); fields the
server does not use (``user``, ``logprobs``, ``frequency_penalty``, ...) are accepted and ignored, as
vLLM does, so stock OpenAI clients work. Checks that need the model (context length, the chat
template) stay in :mod:`ktlab.serve.api`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ktlab.config import check_positive_ints


def _whole(value):
    """JSON Schema counts 2.0 as an integer: take it as 2 (strings and booleans stay refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _real(value):
    """An integer where a number is asked for is that number (booleans stay refused)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def whole(**constraints) -> type:
    """A strict integer field type (2.0 taken as 2) with ``Field`` constraints (ge=, le=...)."""
    return Annotated[StrictInt, Field(**constraints), BeforeValidator(_whole)]


def number(**constraints) -> type:
    """A strict, finite number field type (integers taken as floats) with ``Field`` constraints."""
    return Annotated[StrictFloat, Field(allow_inf_nan=False, **constraints), BeforeValidator(_real)]


WholeInt = whole()


class _Lenient(BaseModel):
    """Unknown fields are ignored (OpenAI clients send more than we use)."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    """One text part of a message's content (images and audio are refused)."""

    type: Literal["text"]
    text: StrictStr


class Message(_Lenient):
    """A chat message: a role and text content."""

    role: StrictStr
    content: StrictStr | list[TextPart] | None = ""


class StreamOptions(_Lenient):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: StrictBool = False


class SamplingFields(_Lenient):
    """Fields both routes share."""

    model: StrictStr | None = None
    max_tokens: whole(ge=1) | None = None
    temperature: number(ge=0, le=2) | None = None
    top_p: number(gt=0, le=1) | None = None
    top_k: whole(ge=0) | None = None
    seed: WholeInt | None = None
    n: whole(ge=1, le=1, description="only 1 is supported") | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = Field(None, description="vLLM's extension: generate past the end token")


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: whole(ge=1) | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] | \
        Annotated[list[whole(ge=0)], Field(min_length=1)]


#: Every field name of the request models: how an error's location names a field, not a type tag.
FIELD_NAMES = frozenset(name for model in (Message, TextPart, StreamOptions, ChatCompletionRequest, CompletionRequest)
                        for name in model.model_fields)


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {...}}``."""

    error: ErrorDetail


#: What the completion routes answer: a JSON completion, or with ``stream`` server-sent events;
#: besides, the errors (all with an OpenAI error body).
COMPLETION_RESPONSES = {
    200: {"description": "the completion (JSON), or with \"stream\": true its chunks as server-sent events",
          "content": {"text/event-stream": {"schema": {  # one event: a JSON chunk, or [DONE] at the end
              "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
              "required": ["data"]}}}},
}
ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "request body or prompt over the server's limit"},
    429: {"model": ErrorResponse, "description": "too many requests at once, or the queue is full"},
}


@dataclass(frozen=True)
class ServeLimits:
    """Limits on the way in (over one: 413 or 429 with an OpenAI error body).

    ``max_body_bytes``: request body size; ``max_prompt_tokens``: prompt length after the chat
    template (None: the context length alone limits it, with a 400); ``max_connections``: /v1
    requests in flight at once; ``max_queue``: requests waiting for admission to the engine."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_connections: int = 256
    max_queue: int = 1024

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_body_bytes", "max_connections", "max_queue"))
        check_positive_ints(self, ("max_prompt_tokens",), allow_none=True)
