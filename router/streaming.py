"""Streamed responses pushed to the client as the tokens arrive.

A decode node's engine step brings one token for each of its streams, in one
message. With one task per stream, each stream's chunk waits for that task's
turn in the event loop (a wake-up, an async generator, the ASGI layers); at 32
streams the last one wrote ~3 ms after the message arrived on two cores. Here
the message's handler renders and writes each stream's chunk itself, as it
delivers the stream's event: :class:`SSEResponse` makes itself every sequence's
event sink (``Inflight.events``) once its headers are out, and
:class:`EagerSender` calls the ASGI ``send`` without a task. The response's end
(the chunked encoding's last, empty chunk) goes in the same write as its last
events: every write wakes the client, which on a small machine runs on the
router's cores.

An ASGI ``send`` is a coroutine, but the server's (uvicorn's) writes to the
socket and returns without awaiting anything unless the client stopped reading
(its write buffer is full). :class:`EagerSender` runs it up to its first
suspension, as Python 3.12's eager tasks do: usually it has finished by then;
otherwise a task finishes it and later chunks queue behind it, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Coroutine

from starlette.responses import Response

from router.responder import Responder

log = logging.getLogger("disagg.router")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


class _Resume:
    """Awaitable: the rest of ``coro``, which was stepped once by hand and then yielded
    ``waiting`` (what it awaits, for the awaiting task to wait on)."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine, waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self):
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                yield waiting
            except BaseException as exc:        # thrown into the awaiting task: pass it on
                step, arg = coro.throw, exc
            else:
                step, arg = coro.send, None
            try:
                waiting = step(arg)
            except StopIteration as stop:
                return stop.value


class EagerSender:
    """Writes body chunks through an ASGI ``send`` from synchronous code, in order.

    :meth:`write` runs ``send`` at once; if it has to wait (flow control), a task
    finishes it and chunks written meanwhile go out together after it. An error
    from ``send`` is raised by :meth:`write` when it happens there, else passed
    to ``on_error``.
    """

    def __init__(self, send: Send, on_error: Callable[[BaseException], None]) -> None:
        self._send, self._on_error = send, on_error
        self._backlog: list[bytes] | None = None     # chunks behind a send that waits
        self._task: asyncio.Task | None = None
        self.ended = False                           # the body's last chunk was written

    def write(self, body: bytes, more: bool = True) -> None:
        """Send ``body`` now, or after the send that is waiting; ``more=False``: it is the
        body's last chunk (the server ends the response with it, in the same write)."""
        if self.ended:
            raise RuntimeError("the response body has ended; nothing more can be written")
        self.ended = not more
        if self._backlog is not None:
            self._backlog.append(body)
            return
        coro = self._send({"type": "http.response.body", "body": body, "more_body": more})
        try:
            waiting = coro.send(None)         # an error raised here reaches the caller
        except StopIteration:
            return
        self._backlog = []
        self._task = asyncio.ensure_future(self._finish(_Resume(coro, waiting)))

    async def _finish(self, first: _Resume) -> None:
        try:
            await first
            while self._backlog:
                body = b"".join(self._backlog)
                self._backlog.clear()
                # no write follows the last chunk: if it was written, it is in ``body``
                await self._send({"type": "http.response.body", "body": body,
                                  "more_body": not self.ended})
            self._backlog = None
        except Exception as exc:
            self._on_error(exc)

    async def drain(self) -> None:
        """Wait until every chunk written so far has been sent."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def close(self) -> None:
        """Stop a send still waiting (the response is over)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()


class SSEResponse(Response):
    """A ``text/event-stream`` response over ``responder``'s sequences, each chunk
    written by whoever delivers its event (see the module docstring).

    Every sequence is aborted if the client leaves, or when the response ends
    for any reason before they did; ``egress`` (a histogram child, a
    :class:`router.metrics.Deferred`, or None) observes, per token-carrying chunk,
    node sent → bytes handed to the server.
    """

    media_type = "text/event-stream"

    def __init__(self, responder: Responder, egress=None,
                 headers: dict[str, str] | None = None) -> None:
        self.responder, self.egress = responder, egress
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._pending: list = []             # events not yet rendered
        self._flush_soon = False
        self._writer: EagerSender | None = None
        self._ended: asyncio.Future | None = None

    # -- the sink every sequence puts its events on (Inflight.events) -------------

    def put_nowait(self, item: tuple[int, Any]) -> None:
        """Take one ``(index, event)``: written at once when the response has one
        sequence, else with the others that arrive in the same loop turn (one engine
        step brings one per sequence: one write for all)."""
        self._pending.append(item)
        if self._writer is None:
            return
        if len(self.responder.seqs) == 1:
            self._flush()
        elif not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._ended.done():
            self._pending.clear()
            return
        batch, self._pending = self._pending, []
        try:
            body, sent = self.responder.render(batch)
            if self.responder.ended:           # the end goes with the last chunk: one write
                self._writer.write(body, more=False)
            elif body:
                self._writer.write(body)
        except Exception as exc:            # a failing stream must not break the caller
            self._fail(exc)                  # (the handler delivering a whole step)
            return
        if self.egress is not None and sent:
            now = time.monotonic()
            for at in sent:
                self.egress.observe(max(now - at, 0.0))
        if self.responder.ended:
            self._ended.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self._ended.done():
            log.debug("stream %s ended by %r", self.responder.id, exc)
            self._ended.set_exception(exc)

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        self._ended = asyncio.get_running_loop().create_future()
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            self._writer = EagerSender(send, self._fail)
            queued = self.responder.events
            for seq in self.responder.seqs:
                seq.req.events = self
            while not queued.empty():
                self._pending.append(queued.get_nowait())
            if self._pending:
                self._flush()
            await asyncio.wait((self._ended, gone), return_when=asyncio.FIRST_COMPLETED)
            if self._ended.done():
                self._ended.result()          # raises if a write failed
                await self._writer.drain()
        finally:
            gone.cancel()
            if self._writer is not None:
                self._writer.close()
            if not self._ended.done():
                self._ended.cancel()          # events that still come are dropped
            self.responder.abort()            # no-op for sequences that ended


async def _disconnect(receive: Receive) -> None:
    """Return when the client has gone (ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass
