"""The router's ``/openapi.json``: request models, response shapes and error bodies.

The endpoints read their bodies themselves (strict validation, OpenAI error
bodies, a 429 check that must not be separated from the submit by an
``await``), so FastAPI cannot infer their schemas; :func:`install_openapi`
adds them: the request models of :mod:`router.protocol`, the response models
below (which describe what :mod:`router.openai_responses` builds) and the
error body of :class:`router.errors.ProtocolError` for every error status.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router.protocol import ChatCompletionRequest, CompletionRequest

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    """Token counts: prompts once each, every generated sequence's tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """``/v1/completions`` logprobs (``null`` entries only for an echoed prompt's first token)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice; ``index`` is prompt-major (prompt ``p``, copy ``j`` → ``p * n + j``)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    """A whole ``/v1/completions`` response (``stream: true`` sends SSE chunks instead)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    """One alternative token of a chat logprob entry."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    """One generated token's chat logprob entry."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat logprobs: one entry per generated token."""

    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    """One chat choice."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """A whole ``/v1/chat/completions`` response (``stream: true`` sends SSE chunks)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: ErrorDetail


class ModelCard(BaseModel):
    """The served model."""

    id: str
    object: Literal["model"]
    owned_by: str
    max_model_len: int | None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


class NodeHealth(BaseModel):
    """One registered node in ``GET /health``."""

    role: Literal["prefill", "decode"]
    state: Literal["up", "draining"]
    pid: int


class Health(BaseModel):
    """``GET /health`` (200 with a decode node up, else 503). The counts are of nodes
    taking requests; ``nodes`` lists every registered one, draining ones included."""

    status: Literal["ok", "no_decode_node"]
    decode_nodes: int
    prefill_nodes: int
    inflight: int
    nodes: dict[str, NodeHealth]
    router_id: str


_MODELS = (CompletionRequest, ChatCompletionRequest, Completion, ChatCompletion, ErrorResponse,
           ModelList, Health)
_GENERATE = {"/v1/completions": (CompletionRequest, Completion),
             "/v1/chat/completions": (ChatCompletionRequest, ChatCompletion)}
_ERRORS = {"400": "Invalid request", "401": "Missing or wrong API key", "404": "Unknown model",
           "429": "Too many requests in flight (see Retry-After)",
           "500": "Internal error", "502": "The decode node was lost",
           "503": "No decode node, or the request was aborted by the node"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def build_openapi(app: FastAPI) -> dict:
    """The app's OpenAPI document with the request/response/error schemas filled in."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="The OpenAI-compatible API of the disagg router.")
    _, defs = models_json_schema([(m, "validation") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    errors = {code: _json(ErrorResponse, why) for code, why in _ERRORS.items()}
    paths = doc["paths"]
    for path, (request, response) in _GENERATE.items():
        op = paths[path]["post"]
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(request)}}}
        ok = _json(response, "The response, or with stream: true an SSE stream of chunks "
                             "ending with data: [DONE]")
        ok["content"]["text/event-stream"] = {"schema": {  # one SSE event: data is a chunk
            "type": "object", "required": ["data"],        # (JSON) or [DONE]
            "properties": {"data": {"type": "string"}}}}
        op["responses"] = {"200": ok, **errors}
    paths["/v1/models"]["get"]["responses"] = {"200": _json(ModelList, "The served model"),
                                               "401": errors["401"]}
    paths["/health"]["get"]["responses"] = {"200": _json(Health, "A decode node is up"),
                                            "503": _json(Health, "No decode node is up")}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {"200": {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`build_openapi` (built once, on first request) as the app's schema."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
