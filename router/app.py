"""The OpenAI-compatible HTTP front end (FastAPI), on the dispatcher's event loop.

    POST /v1/completions        prompt(s) as text or token ids; stream=true → SSE
    POST /v1/chat/completions   messages through the model's chat template
    GET  /v1/models             the served model
    GET  /health                200 once a decode node is up, else 503; each node's state
    GET  /metrics               Prometheus text
    GET  /openapi.json, /docs   the schema (request models from router.protocol)

Every refusal is an OpenAI error body with a 4xx status: 400 bad input,
401 wrong or missing API key (when one is set), 404 unknown model, 429 when
``max_inflight`` engine requests are already in flight (with ``Retry-After``;
a request with ``n`` > 1, ``best_of`` or several prompts counts as that many)
or when its predicted time to first token exceeds the SLO (:mod:`router.admission`),
503 while no decode node is up (with ``Retry-After`` too: a supervisor is
bringing one back, or a draining one is leaving). A handler bug becomes a 500
error body, logged; the nodes never see a request the router could not validate.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.dispatch import Dispatcher
from router.errors import ProtocolError, bad
from router.metrics import WorkersView
from router.openapi_schema import install_openapi
from router.model_limits import check_context, check_model, check_token_ids, default_max_tokens
from router.protocol import parse_request
from router.responder import Responder, ResponseSpec, wait_or_disconnect
from router.streaming import SSEResponse

log = logging.getLogger("disagg.router")

INLINE_TOKENIZE_CHARS = 512
"""Prompts shorter than this (characters, all of a request's together) are tokenized on
the event loop: that takes ~50 us, while the hop to a worker thread and back costs
~200 us idle and more under load (measured on 2 cores); longer ones go to a thread so
a big prompt does not stall every stream."""


def _prompt_chars(parsed, chat: bool) -> int:
    """A request's prompt text length in characters (token-id prompts count 0)."""
    if chat:
        return sum(len(msg.content) for msg in parsed.messages)
    return sum(len(p) for p in parsed.prompt if isinstance(p, str))


def create_app(dispatcher: Dispatcher, registry: CollectorRegistry | WorkersView, tokenizer,
               model_name: str, api_key: str | None = None, max_inflight: int = 256,
               retry_after_s: int = 1) -> FastAPI:
    """The HTTP app serving ``model_name`` through ``dispatcher``; ``/metrics`` serves
    ``registry`` (the router's own, or every worker's sum through a :class:`WorkersView`)."""
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight!r}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher.start()
        yield
        await dispatcher.close()

    app = FastAPI(title="disagg router", version="0.1.0", redoc_url=None, lifespan=lifespan)
    install_openapi(app)
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
            parsed = parse_request(await request.body(), chat)
            check_model(parsed.model, [model_name])
            max_len, vocab = context()
            check_token_ids(sorted(parsed.logit_bias or ()), vocab, "logit_bias")
            if _prompt_chars(parsed, chat) < INLINE_TOKENIZE_CHARS:
                prompts, echo_texts = tokenize(parsed, chat)
            else:
                prompts, echo_texts = await asyncio.to_thread(tokenize, parsed, chat)
            param = "messages" if chat else "prompt"
            budgets = []
            for ids in prompts:
                check_token_ids(ids, vocab, param)
                max_tokens = parsed.requested_max_tokens
                if max_tokens is None:
                    max_tokens = default_max_tokens(len(ids), max_len, param)
                check_context(len(ids), max_tokens, max_len, param)
                budgets.append(max_tokens)
            total = len(prompts) * parsed.copies
            if total > max_inflight:
                field = "best_of" if getattr(parsed, "best_of", None) else "n" \
                    if parsed.n > 1 else "prompt"
                raise bad(field, f"the request asks for {total} sequences ({len(prompts)} "
                                 f"prompt(s) x {parsed.copies}); this server runs at most "
                                 f"{max_inflight} at once")
            # The capacity check and the submits have no await between them, so a burst
            # cannot slip past the limit while its bodies are being read.
            if len(dispatcher.inflight) + total > max_inflight:
                metrics.rejected.labels(reason="max_inflight").inc()
                raise ProtocolError(429, f"the server is at capacity ({max_inflight} requests in "
                                         f"flight); retry after {retry_after_s} s",
                                    code="rate_limit_exceeded", type="rate_limit_error")
            reqs = submit(prompts, budgets, parsed, arrival)
        except ProtocolError as exc:
            headers = {"Retry-After": str(retry_after_s)} if exc.status in (429, 503) else None
            return error(exc, headers)
        spec = ResponseSpec(chat=chat, n=parsed.n, copies=parsed.copies,
                            logprobs=parsed.response_logprobs,
                            echo_texts=echo_texts, include_usage=parsed.include_usage,
                            timing=request.headers.get("x-disagg-timing") == "1")
        responder = Responder(dispatcher, reqs, tokenizer, model_name, spec)
        if parsed.stream:
            return SSEResponse(responder, metrics.egress_soon,
                               headers={"Cache-Control": "no-cache"})
        try:
            body = await wait_or_disconnect(responder.whole(), request.is_disconnected,
                                            responder.abort)
        except ProtocolError as exc:
            return error(exc)
        return JSONResponse(body)

    def submit(prompts: list[list[int]], budgets: list[int], parsed, arrival: float) -> list:
        """One engine request per prompt × copy, prompt-major, on one event queue."""
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for ids, max_tokens in zip(prompts, budgets):
                for copy in range(parsed.copies):
                    params = parsed.sampling_params(max_tokens, copy)
                    reqs.append(dispatcher.submit(ids, params, arrival, events, len(reqs)))
        except ProtocolError:
            for req in reqs:
                dispatcher.abort(req.rid)
            raise
        return reqs

    def tokenize(parsed, chat: bool) -> tuple[list[list[int]], tuple[str, ...] | None]:
        """The prompts' token ids and, for ``echo``, their texts (on the loop for short
        prompts, else in a worker thread: see ``INLINE_TOKENIZE_CHARS``)."""
        if chat:
            messages = [{"role": msg.role, "content": msg.content} for msg in parsed.messages]
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as exc:    # template errors come in many types
                raise ProtocolError(400, f"the chat template failed: {exc}",
                                    param="messages") from None
            return [ids], None
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p)
                   for p in parsed.prompt]
        if not parsed.echo:
            return prompts, None
        return prompts, tuple(p if isinstance(p, str) else tokenizer.decode(ids)
                              for p, ids in zip(parsed.prompt, prompts))

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
        """Counts of the nodes taking requests (draining ones not counted), every
        registered node's role and state ("up" | "draining"), this router's id."""
        reg = dispatcher.registry
        body = {"decode_nodes": len(reg.usable("decode")),
                "prefill_nodes": len(reg.usable("prefill")),
                "inflight": len(dispatcher.inflight),
                "nodes": {n.node_id: {"role": n.info.role, "state": n.state, "pid": n.info.pid}
                          for n in reg.nodes.values()},
                "router_id": dispatcher.router_id}
        body["status"] = "ok" if body["decode_nodes"] else "no_decode_node"
        return JSONResponse(body, status_code=200 if body["decode_nodes"] else 503,
                            headers=None if body["decode_nodes"] else
                            {"Retry-After": str(retry_after_s)})

    @app.get("/metrics")
    async def prometheus():
        for name, labels, value in dispatcher.policy.snapshot():
            metrics.calibration.labels(name=name, role=labels.get("role", ""),
                                       node=labels.get("node", "")).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(ProtocolError(500, "internal server error", type="server_error"))

    return app
