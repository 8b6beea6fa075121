"""A keep-alive HTTP/1.1 connection that stamps every read the moment it arrives.

``disagg bench router`` measures how long tokens take from the decode node
to the client. A general client (httpx) parses the response in Python before
its caller sees the bytes; with 32 streams on one event loop, a chunk's stamp
then waits for every chunk handled before it in that loop turn (~0.3-0.4 ms of
client CPU each on a 2-core machine), and the client's work lands in the
router's figure. Here the stamp is taken in ``data_received`` — the first
Python code the event loop runs for the socket's bytes — and the response is
de-chunked by httptools (the C parser uvicorn uses) in the same call, so
nothing a stream does after its bytes arrive delays another stream's stamp.
Nothing else runs per read: the pieces are kept, and the caller is woken once,
when the response has ended. On a small machine the client shares the cores
with the server it measures, and a Python wake-up and parse per chunk is CPU
the router then lacks (``disagg bench router`` at 32 streams on 2 cores: 68 us
of client CPU per token with a wake-up per chunk, 32-42 us without); a client
on another machine would not take it.

One request at a time per connection; ``Connection.request`` returns the
response body as ``(stamp, body bytes)`` pairs, stamp being ``time.monotonic()``
of the read that carried them.
"""

from __future__ import annotations

import asyncio
import json
import time

import httptools


class _Protocol(asyncio.Protocol):
    """Feeds a socket's bytes to the current response's parser, stamped on arrival."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.reads: list[tuple[float, bytes]] = []      # the current response's body
        self.ended: asyncio.Future | None = None        # set when it ends (or the socket does)
        self.now = 0.0
        self.status = 0
        self.lost: BaseException | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.now = time.monotonic()
        if self.parser is None:
            self.lost = ConnectionError(f"unexpected bytes with no request open: {data[:80]!r}")
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.lost = ConnectionError(f"malformed HTTP response: {exc}")
            self._end()
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.lost is None:
            self.lost = exc or ConnectionError("the server closed the connection")
        self._end()

    def _end(self) -> None:
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    # httptools callbacks, during feed_data
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.reads.append((self.now, body))

    def on_message_complete(self) -> None:
        self.parser = None
        self._end()


class HTTPStatusError(RuntimeError):
    """The server answered with a status of 400 or more."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body.decode(errors='replace')[:300]}")
        self.status, self.body = status, body


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port`` (opened on first use, and
    again after the server closes it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._proto: _Protocol | None = None

    async def _open(self) -> _Protocol:
        if self._proto is None or self._proto.lost is not None:
            loop = asyncio.get_running_loop()
            _, self._proto = await loop.create_connection(_Protocol, self.host, self.port)
        return self._proto

    async def request(self, method: str, path: str, body: dict | None = None,
                      headers: dict[str, str] | None = None) -> list[tuple[float, bytes]]:
        """Send one request; once its response has ended, its body as ``(stamp, body
        bytes)`` pairs, each stamped when its read arrived. Raises
        :class:`HTTPStatusError` for a status >= 400 and ``ConnectionError`` if the
        connection ends before the response does."""
        proto = await self._open()
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}",
                 f"content-length: {len(payload)}"]
        if body is not None:
            lines.append("content-type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        proto.status, proto.reads = 0, []
        proto.ended = asyncio.get_running_loop().create_future()
        proto.parser = httptools.HttpResponseParser(proto)
        proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await proto.ended
        if proto.parser is not None:
            raise ConnectionError(f"the response ended early: {proto.lost}")
        if proto.status >= 400:
            raise HTTPStatusError(proto.status, b"".join(data for _, data in proto.reads))
        return proto.reads

    def close(self) -> None:
        """Close the connection (a later request opens a new one)."""
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
