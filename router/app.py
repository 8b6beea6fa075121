"""The OpenAI-compatible HTTP front end (FastAPI), on the dispatcher's event loop.

    POST /v1/completions        prompt as text or token ids; stream=true → SSE
    POST /v1/chat/completions   messages through the model's chat template
    GET  /v1/models             the served model
    GET  /health                200 once a decode node is up, else 503
    GET  /metrics               Prometheus text

Every refusal is an OpenAI error body with a 4xx status: 400 bad input,
401 wrong or missing API key (when one is set), 404 unknown model, 429 when
``max_inflight`` requests are already in flight (with ``Retry-After``), 503
while no decode node is up. A handler bug becomes a 500 error body, logged;
the nodes never see a request the router could not validate.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from disagg.sampling_params import SamplingParams
from router.dispatch import Dispatcher
from router.metrics import CONTENT_TYPE, Registry
from router.protocol import (
    ProtocolError, check_context, check_model, check_prompt_token_ids, default_max_tokens,
    parse_chat_request, parse_completion_request)
from router.responder import Responder, wait_or_disconnect

log = logging.getLogger("disagg.router")


def create_app(dispatcher: Dispatcher, registry: Registry, tokenizer, model_name: str,
               api_key: str | None = None, max_inflight: int = 256,
               retry_after_s: int = 1) -> FastAPI:
    """The HTTP app serving ``model_name`` through ``dispatcher``."""
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight!r}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher.start()
        yield
        await dispatcher.close()

    app = FastAPI(title="disagg router", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    metrics = dispatcher.metrics

    def error(exc: ProtocolError, headers: dict | None = None) -> JSONResponse:
        metrics.http_errors.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ProtocolError(401, "Incorrect or missing API key (Authorization: Bearer ...).",
                                code="invalid_api_key")

    async def read_json(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(400, f"the request body is not valid JSON: {exc}") from None

    def context() -> tuple[int, int]:
        max_len = dispatcher.registry.max_model_len()
        if max_len is None:
            raise ProtocolError(503, "no decode node is available; retry shortly",
                                code="no_decode_node", type="service_unavailable")
        return max_len, dispatcher.registry.vocab_size()

    async def serve(request: Request, chat: bool):
        arrival = time.monotonic()
        try:
            check_key(request)
            body = await read_json(request)
            parsed = parse_chat_request(body) if chat else parse_completion_request(body)
            check_model(parsed.model, [model_name])
            max_len, vocab = context()
            ids = prompt_ids(parsed, chat)
            check_prompt_token_ids(ids, vocab)
            param = "messages" if chat else "prompt"
            if parsed.max_tokens is None:
                kwargs = parsed.sampling_kwargs(default_max_tokens(len(ids), max_len, param))
            else:
                kwargs = parsed.sampling_kwargs()
            check_context(len(ids), kwargs["max_tokens"], max_len, param)
            try:
                params = SamplingParams(**kwargs)
            except ValueError as exc:
                raise ProtocolError(400, str(exc)) from None
            # The capacity check and the submit have no await between them, so a burst
            # cannot slip past the limit while its bodies are being read.
            if len(dispatcher.inflight) >= max_inflight:
                raise ProtocolError(429, f"the server is at capacity ({max_inflight} requests in "
                                         f"flight); retry after {retry_after_s} s",
                                    code="rate_limit_exceeded", type="rate_limit_error")
            req = dispatcher.submit(ids, params, arrival)
        except ProtocolError as exc:
            headers = {"Retry-After": str(retry_after_s)} if exc.status == 429 else None
            return error(exc, headers)
        responder = Responder(dispatcher, req, tokenizer, model_name, chat, params.logprobs,
                              bool(parsed.include_usage),
                              timing=request.headers.get("x-disagg-timing") == "1")
        if parsed.stream:
            return StreamingResponse(responder.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            body = await wait_or_disconnect(responder.whole(), request.is_disconnected,
                                            lambda: dispatcher.abort(req.rid))
        except ProtocolError as exc:
            return error(exc)
        return JSONResponse(body)

    def prompt_ids(parsed, chat: bool) -> list[int]:
        if chat:
            messages = [{"role": msg.role, "content": msg.content} for msg in parsed.messages]
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True)
            except Exception as exc:    # template errors come in many types
                raise ProtocolError(400, f"the chat template failed: {exc}",
                                    param="messages") from None
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if isinstance(parsed.prompt, str):
            return tokenizer.encode(parsed.prompt, add_special_tokens=False)
        return list(parsed.prompt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ProtocolError as exc:
            return error(exc)
        max_len = dispatcher.registry.max_model_len()
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "owned_by": "disagg", "max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        reg = dispatcher.registry
        body = {"decode_nodes": len(reg.of_role("decode")),
                "prefill_nodes": len(reg.of_role("prefill")),
                "inflight": len(dispatcher.inflight)}
        body["status"] = "ok" if body["decode_nodes"] else "no_decode_node"
        return JSONResponse(body, status_code=200 if body["decode_nodes"] else 503)

    @app.get("/metrics")
    async def prometheus():
        snapshot = getattr(dispatcher.policy, "snapshot", None)
        for name, labels, value in (snapshot() if snapshot else []):
            metrics.calibration.labels(name=name, role=labels.get("role", ""),
                                       node=labels.get("node", "")).set(value)
        return Response(registry.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(ProtocolError(500, "internal server error", type="server_error"))

    return app
