"""router.streaming: the eager ASGI sender (in order, behind a send that has to wait,
also through uvicorn to a client that stops reading; errors; cancellation) and the
pushed SSE response (written as events arrive, one write per loop turn for several
sequences, client disconnect aborts) over plain ASGI callables; the router's HTTP
tests cover the same path end to end."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from conftest import needs_smollm2
from disagg.model.tokenizer import ModelTokenizer
from disagg.sampling_params import SamplingParams
from router.dispatch import Dispatcher
from router.inflight import Event, Inflight
from router.metrics import RouterMetrics
from router.nodes import NodeRegistry
from router.policy import make_policy
from router.responder import Responder, ResponseSpec
from router.streaming import EagerSender, SSEResponse


def body(chunk: bytes) -> dict:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


def test_eager_sender_sends_in_the_callers_turn_when_send_need_not_wait():
    async def run():
        sent = []

        async def send(message):
            sent.append(message["body"])

        writer = EagerSender(send, on_error=pytest.fail)
        writer.write(b"a")
        writer.write(b"b")
        assert sent == [b"a", b"b"]               # no task, no await in between
        await writer.drain()

    asyncio.run(run())


def test_eager_sender_queues_behind_a_send_that_waits_and_keeps_order():
    async def run():
        sent, gate = [], asyncio.Event()

        async def send(message):
            if message["body"] == b"slow":
                await gate.wait()                  # the client stopped reading
            sent.append(message["body"])

        writer = EagerSender(send, on_error=pytest.fail)
        writer.write(b"first")
        writer.write(b"slow")
        writer.write(b"x")
        writer.write(b"y")
        await asyncio.sleep(0.01)
        assert sent == [b"first"]
        gate.set()
        await writer.drain()
        assert sent == [b"first", b"slow", b"xy"]   # the backlog goes out as one write
        writer.write(b"z")                          # and then eagerly again
        assert sent[-1] == b"z"

    asyncio.run(run())


def test_eager_sender_last_chunk_ends_the_body_in_the_same_send():
    async def run():
        sent, gate = [], asyncio.Event()

        async def send(message):
            if message["body"] == b"slow":
                await gate.wait()
            sent.append((message["body"], message["more_body"]))

        direct = EagerSender(send, on_error=pytest.fail)
        direct.write(b"a")
        direct.write(b"end", more=False)
        assert sent == [(b"a", True), (b"end", False)] and direct.ended
        with pytest.raises(RuntimeError, match="ended"):
            direct.write(b"late")
        sent.clear()
        queued = EagerSender(send, on_error=pytest.fail)
        queued.write(b"slow")
        queued.write(b"x")
        queued.write(b"end", more=False)              # behind the waiting send
        gate.set()
        await queued.drain()
        assert sent == [(b"slow", True), (b"xend", False)]

    asyncio.run(run())


def test_eager_sender_errors_reach_the_caller_or_on_error():
    async def run():
        errors, gate = [], asyncio.Event()

        async def broken(message):
            raise OSError("connection reset")

        with pytest.raises(OSError, match="reset"):
            EagerSender(broken, on_error=pytest.fail).write(b"a")

        async def fails_later(message):
            await gate.wait()
            raise OSError("late reset")

        writer = EagerSender(fails_later, on_error=errors.append)
        writer.write(b"a")
        gate.set()
        await writer.drain()
        assert [str(e) for e in errors] == ["late reset"]

    asyncio.run(run())


def test_eager_sender_close_cancels_a_waiting_send():
    async def run():
        cleaned = []

        async def send(message):
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append(message["body"])

        writer = EagerSender(send, on_error=pytest.fail)
        writer.write(b"a")
        writer.write(b"b")
        await asyncio.sleep(0.01)
        writer.close()
        await asyncio.sleep(0.01)
        assert cleaned == [b"a"]                   # the waiting send saw its cancellation

    asyncio.run(run())


def test_eager_sender_through_uvicorn_to_a_client_that_stops_reading():
    """The suspension path against the real server: 8 MiB written at once, in 64 KiB
    chunks, while the client reads nothing for a while (uvicorn's send then waits
    for the socket to drain); every byte arrives, in order."""
    chunks = [bytes([i]) * 65536 for i in range(128)]
    state = {}

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        writer = EagerSender(send, on_error=pytest.fail)
        for chunk in chunks:
            writer.write(chunk)
        state["waited"] = writer._task is not None     # some send had to wait
        await writer.drain()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def run():
        sock = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        try:
            while not server.started:
                await asyncio.sleep(0.01)
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("GET", url) as r:
                    await asyncio.sleep(0.5)                # not reading
                    body = b"".join([b async for b in r.aiter_bytes()])
        finally:
            server.should_exit = True
            await serving
        return body

    assert asyncio.run(run()) == b"".join(chunks)
    assert state["waited"]


# ---- SSEResponse over a real Responder, Dispatcher (unstarted) and tokenizer -----------

@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return ModelTokenizer.from_dir(smollm2_dir)


@pytest.fixture
def d():
    dispatcher = Dispatcher(NodeRegistry("m"), make_policy("local"),
                            RouterMetrics(CollectorRegistry()), "tcp://127.0.0.1:*")
    yield dispatcher
    asyncio.run(dispatcher.close())


def submitted(dispatcher: Dispatcher, tok, copies: int) -> list[Inflight]:
    """``copies`` sequences of one prompt, in flight in ``dispatcher``, on one queue."""
    events: asyncio.Queue = asyncio.Queue()
    reqs = []
    for i in range(copies):
        req = Inflight(f"r{i}", tok.encode("Hi"), SamplingParams(max_tokens=8), [], 0.0,
                       "decode-0", None, "local", index=i)
        req.events = events
        dispatcher.inflight[req.rid] = req
        reqs.append(req)
    return reqs


class Client:
    """An ASGI peer: records what is sent; ``leave()`` makes receive report a disconnect."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.gone = asyncio.Event()

    async def send(self, message: dict) -> None:
        self.messages.append(message)

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def writes(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]


@needs_smollm2
def test_sse_response_writes_each_event_as_it_is_delivered(d, tok):
    async def run():
        [req] = submitted(d, tok, 1)
        words = tok.encode(" one two")
        req.deliver(Event(words[:1], [None]))          # before the response started
        client = Client()
        responder = Responder(d, [req], tok, "m", ResponseSpec(chat=False))
        task = asyncio.ensure_future(SSEResponse(responder)({"type": "http"},
                                                            client.receive, client.send))
        await asyncio.sleep(0.01)
        assert len(client.writes()) == 1               # the queued event, at start
        req.deliver(Event(words[1:], [None]))
        assert len(client.writes()) == 2               # written inside deliver itself
        req.deliver(Event([], [], True, "length", " one two"))
        await asyncio.wait_for(task, 5)
        assert len(client.writes()) == 3               # the end went with the last chunk
        assert client.messages[-1]["more_body"] is False
        events = b"".join(client.writes()).split(b"\n\n")[:-1]
        assert events[-1] == b"data: [DONE]"
        texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
        assert "".join(texts) == " one two"

    asyncio.run(run())


@needs_smollm2
def test_sse_response_coalesces_a_steps_events_and_aborts_when_the_client_leaves(d, tok):
    async def run():
        reqs = submitted(d, tok, 2)
        client = Client()
        responder = Responder(d, reqs, tok, "m", ResponseSpec(chat=False, n=2, copies=2))
        task = asyncio.ensure_future(SSEResponse(responder)({"type": "http"},
                                                            client.receive, client.send))
        await asyncio.sleep(0.01)
        word = tok.encode(" yes")
        for req in reqs:                               # one engine step's tokens
            req.deliver(Event(word, [None]))
        assert client.writes() == []                   # not yet: at the loop's next turn
        await asyncio.sleep(0.01)
        [write] = client.writes()                      # both chunks, one write
        assert [json.loads(e[6:])["choices"][0]["index"]
                for e in write.split(b"\n\n")[:-1]] == [0, 1]
        client.gone.set()
        await asyncio.wait_for(task, 5)
        assert d.inflight == {}                        # both sequences aborted
        reqs[0].deliver(Event(word, [None]))           # a late token is dropped
        await asyncio.sleep(0.01)
        assert len(client.writes()) == 1
        assert all(m.get("more_body", True) for m in client.messages)   # no end sent

    asyncio.run(run())
