"""Turn a request's token events into an OpenAI response: whole, or streamed as SSE.

Text is decoded by the router (it holds the tokenizer) from all output ids so
far, so bytes split across tokens come out whole. Two things are held back
from a stream until the request ends: an incomplete UTF-8 character (``�``)
and, when the request has stop strings, the last ``len(longest stop) - 1``
characters — a stop string may still complete there, and the node's final
text (stop strings cut) must extend what was sent. The last event then sends
the rest of the node's final text.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from router.dispatch import Dispatcher
from router.inflight import Event, Inflight
from router.openai_responses import (
    SSE_DONE, chat_chunk, chat_logprobs, chat_response, chat_usage_chunk, completion_chunk,
    completion_logprobs, completion_response, completion_usage_chunk, sse)
from router.request_fields import ProtocolError


class OutputText:
    """Incremental output text of one request (see the module docstring)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, ids: list[int]) -> str:
        """Append ``ids``; the text that may be sent now."""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text) - self.hold
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta

    def end(self, ids: list[int], final_text: str | None) -> str:
        """The request ended with ``ids`` (they may complete a stop string): the rest of its
        final text."""
        self.ids += ids
        return self.finish(final_text)

    def finish(self, final_text: str | None) -> str:
        """The request ended: the rest of its final text."""
        text = final_text if final_text is not None else \
            self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class Responder:
    """Builds one request's response; ``chat`` picks the chat shapes."""

    def __init__(self, dispatcher: Dispatcher, req: Inflight, tokenizer, model: str, chat: bool,
                 logprobs: int | None, include_usage: bool, timing: bool = False) -> None:
        self.d, self.req, self.model, self.chat = dispatcher, req, model, chat
        self.text = OutputText(tokenizer, req.params.stop)
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.timing = timing
        self.id = ("chatcmpl-" if chat else "cmpl-") + req.rid
        self.created = int(time.time())
        self._offset = 0

    async def next_event(self) -> Event:
        """The request's next event."""
        return await self.req.events.get()

    def _logprobs(self, event: Event) -> dict | None:
        if self.logprobs is None or not event.token_ids:
            return None
        texts = [self.text.token_text(t) for t in event.token_ids]
        if self.chat:
            return chat_logprobs(texts, event.logprobs, self.text.token_text)
        out = completion_logprobs(texts, event.logprobs, self._offset, self.text.token_text)
        self._offset += sum(map(len, texts))
        return out

    async def whole(self) -> dict:
        """Wait for the end; the complete response body (raises ``ProtocolError``)."""
        all_lps: list = []
        while True:
            event = await self.next_event()
            if event.error is not None:
                raise event.error
            self.text.add(event.token_ids)
            all_lps += event.logprobs
            if event.finished:
                break
        self.text.finish(event.text)
        lps = self._logprobs(Event(self.text.ids, all_lps)) if self.text.ids else None
        args = (self.id, self.model, self.created, self.text.sent, _finish(event),
                len(self.req.prompt), len(self.text.ids), lps)
        return chat_response(*args) if self.chat else completion_response(*args)

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE events up to ``[DONE]``; the request is aborted if the client leaves."""
        try:
            first = True
            while True:
                event = await self.next_event()
                if event.finish_reason == "abort":
                    event.error = _aborted()
                if event.error is not None:
                    yield sse(event.error.body())
                    break
                delta = self.text.end(event.token_ids, event.text) if event.finished \
                    else self.text.add(event.token_ids)
                if delta or event.finished or (event.token_ids and self.logprobs is not None):
                    chunk = self._chunk(delta, _finish(event) if event.finished else None,
                                        self._logprobs(event), first, event)
                    first = False
                    yield sse(chunk)
                if event.sent_at is not None and event.token_ids:
                    self.d.metrics.router_overhead.labels(direction="egress").observe(
                        max(time.monotonic() - event.sent_at, 0.0))
                if event.finished:
                    if self.include_usage:
                        make = chat_usage_chunk if self.chat else completion_usage_chunk
                        yield sse(make(self.id, self.model, self.created, len(self.req.prompt),
                                       len(self.text.ids)))
                    break
            yield SSE_DONE
        finally:
            self.d.abort(self.req.rid)      # no-op once the request ended

    def _chunk(self, delta: str, finish: str | None, lps: dict | None, first: bool,
               event: Event) -> dict:
        if self.chat:
            chunk = chat_chunk(self.id, self.model, self.created, delta, finish, lps,
                               role_first=first)
        else:
            chunk = completion_chunk(self.id, self.model, self.created, delta, finish, lps)
        if self.timing:       # opt-in latency accounting (x-disagg-timing header)
            chunk["disagg_timing"] = {"arrival": self.req.arrival, "ingress_s": self.req.ingress_s,
                                      "dispatch_s": self.req.dispatch_s,
                                      "sent_at": event.sent_at if event.token_ids else None}
        return chunk


def _finish(event: Event) -> str:
    """OpenAI's finish reason for the engine's."""
    if event.finish_reason == "abort":
        raise _aborted()
    return event.finish_reason or "stop"


def _aborted() -> ProtocolError:
    return ProtocolError(503, "the request was aborted by the serving node",
                         code="aborted", type="server_error")


async def wait_or_disconnect(coro, is_disconnected, on_disconnect, poll_s: float = 0.5):
    """Await ``coro`` while polling ``is_disconnected``; call ``on_disconnect`` and
    raise ``asyncio.CancelledError`` if the client left first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                on_disconnect()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
