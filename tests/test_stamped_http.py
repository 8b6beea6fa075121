"""The benchmark's stamped HTTP connection against a real uvicorn + FastAPI server."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvicorn
import uvloop
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from disagg.bench.stamped_http import Connection, HTTPStatusError

GAP_S = 0.2


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/stream")
    async def stream(body: dict):
        async def chunks():
            for i in range(body["n"]):
                if i:
                    await asyncio.sleep(GAP_S)
                yield f"data: {i}\n\n".encode()
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/missing")
    async def missing():
        return JSONResponse({"error": "no such thing"}, status_code=404)

    @app.get("/cut")
    async def cut():
        async def chunks():
            yield b"first"
            raise RuntimeError("the handler failed mid-body")   # uvicorn drops the connection
        return StreamingResponse(chunks())

    return app


async def _with_server(fn):
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=0, loop="none",
                                           log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        return await fn(port)
    finally:
        server.should_exit = True
        await task


def _run(fn):
    return uvloop.run(_with_server(fn))


def test_reads_are_stamped_on_arrival_and_the_connection_is_reused():
    async def go(port):
        conn = Connection("127.0.0.1", port)
        try:
            runs = []
            for _ in range(2):                          # the second request reuses the socket
                t0 = time.monotonic()
                runs.append([(stamp - t0, data) for stamp, data in
                             await conn.request("POST", "/stream", {"n": 3})])
            first_proto = conn._proto
            await conn.request("POST", "/stream", {"n": 1})
            assert conn._proto is first_proto
            return runs
        finally:
            conn.close()

    for reads in _run(go):
        assert b"".join(d for _, d in reads) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        stamps = [s for s, _ in reads]
        assert stamps == sorted(stamps) and stamps[0] < GAP_S
        # each chunk was stamped when it came, not when the response ended
        assert stamps[-1] - stamps[0] >= 1.5 * GAP_S


def test_an_error_status_raises_with_its_body():
    async def go(port):
        conn = Connection("127.0.0.1", port)
        try:
            with pytest.raises(HTTPStatusError) as err:
                await conn.request("GET", "/missing")
            # the connection stays usable after a complete error response
            got = [d for _, d in await conn.request("POST", "/stream", {"n": 1})]
            return err.value, got
        finally:
            conn.close()

    exc, got = _run(go)
    assert exc.status == 404 and b"no such thing" in exc.body
    assert got == [b"data: 0\n\n"]


def test_a_response_cut_short_raises_and_the_next_request_reconnects():
    async def go(port):
        conn = Connection("127.0.0.1", port)
        try:
            with pytest.raises(ConnectionError, match="ended early"):
                await conn.request("GET", "/cut")
            return [d for _, d in await conn.request("POST", "/stream", {"n": 1})]
        finally:
            conn.close()

    assert _run(go) == [b"data: 0\n\n"]
