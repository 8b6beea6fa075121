"""Node uplinks: the TCP connection a registered node's messages take to its router.

- framing: frames survive any split of the stream; an oversized length is refused;
- the router (a real :class:`Dispatcher` on a running loop, its real listener): each
  hello is answered ``UplinkReady``; what an
  uplink brings waits for that uplink's ``UplinkSwitch``, whichever comes first; an
  uplink that ends counts as its node's connection ending, unless a newer one replaced
  it or the node restarted; a stream that does not begin with ``UplinkHello`` is cut;
- the router's messages on the uplink: a node whose hello says ``downlink`` gets
  ``DownlinkSwitch`` (naming its end of the connection) as the control socket's last
  message once its uplink is released, and everything after on the uplink; a node
  whose hello does not, and a node whose uplink ended, get the control socket;
- the node (a real :class:`NodeServer` on a tiny engine, a scripted control socket and
  a plain listening socket as the router): it opens the offered uplink, says
  ``UplinkHello`` there, sends nothing on it until the router's ``UplinkReady`` (a wrong
  port swallows nothing), then ``UplinkSwitch`` on the control socket; sends its tokens on
  the uplink, goes back to the control socket when the uplink ends, and opens a new one
  for a new router process; what the router writes on the uplink waits for its
  ``DownlinkSwitch`` for that connection (one naming another is ignored), then runs in
  order; an offered port that refuses the connection is tried again
  (after a wait that doubles), and the node switches once something listens there;
- the node's writer never blocks: what the kernel does not take waits, and past the
  limit a send is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import select
import socket
import time

import pytest

from disagg.control import framing
from disagg.control import messages as m
from disagg.control.framing import FrameReader, framed
from disagg.node import router_links
from disagg.node import uplink as node_uplink
from disagg.node.uplink import Uplink, UplinkClosed
from router.dispatch import Dispatcher
from router_helpers import recording_dispatcher, register_message
from test_node_server_lifecycle import LONG, running_node


# ---------------------------------------------------------------- framing

def test_frames_survive_every_split_of_the_stream():
    frames = [m.encode(m.Drain("d0")), b"", m.encode(m.UplinkHello("d0", 7)) * 50]
    stream = b"".join(framed(f) for f in frames)
    for cut in range(len(stream) + 1):
        r = FrameReader()
        assert r.feed(stream[:cut]) + r.feed(stream[cut:]) == frames and r.pending == 0
    r = FrameReader()
    assert [f for b in stream for f in r.feed(bytes([b]))] == frames


def test_an_oversized_frame_is_refused(monkeypatch):
    monkeypatch.setattr(framing, "MAX_FRAME_BYTES", 10)
    with pytest.raises(ValueError, match="over the stream's limit"):
        framed(b"x" * 11)
    with pytest.raises(m.ControlError, match="over the limit"):
        FrameReader().feed((11).to_bytes(4, "big") + b"x")
    assert FrameReader().feed(framed(b"x" * 10)) == [b"x" * 10]


# ---------------------------------------------------------------- the router's side

async def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _uplink(d, *msgs) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", d.uplink_port)
    writer.write(b"".join(framed(m.encode(x)) for x in msgs))
    await writer.drain()
    return reader, writer


def _router_scenario(body) -> None:
    async def main():
        d = recording_dispatcher()
        d.start()
        try:
            d.handlers.handle("d0", register_message("d0", pid=10), b"")
            assert d.sent[-1] == ("d0", m.Registered("d0", d.router_id, d.uplink_port))
            await body(d)
        finally:
            await d.close()
    asyncio.run(main())


def test_the_router_holds_an_uplink_until_its_switch():
    async def body(d):
        node = d.registry.nodes["d0"]
        _, w = await _uplink(d, m.UplinkHello("d0", 10), m.Drain("d0"))
        await _until(lambda: d.uplinks.connected() == {"d0": 10})
        assert d.sent[-1] == ("d0", m.UplinkReady("d0", 10))
        await asyncio.sleep(0.2)
        assert not node.draining              # held: the switch has not been handled
        d.handlers.handle("d0", m.UplinkSwitch("d0", 10), b"")
        assert node.draining                  # released in order at the switch
        w.write(framed(m.encode(m.Deregister("d0"))))
        await _until(lambda: "d0" not in d.registry.nodes)
        w.close()
    _router_scenario(body)


def test_a_switch_before_the_hello_releases_the_uplink_at_once():
    async def body(d):
        d.handlers.handle("d0", m.UplinkSwitch("d0", 10), b"")
        _, w = await _uplink(d, m.UplinkHello("d0", 10), m.Drain("d0"))
        await _until(lambda: d.registry.nodes["d0"].draining)
        w.close()
    _router_scenario(body)


def test_an_uplink_that_ends_loses_its_node_unless_replaced_or_restarted():
    async def body(d):
        first, _ = await _uplink(d, m.UplinkHello("d0", 10))
        d.handlers.handle("d0", m.UplinkSwitch("d0", 10), b"")
        await _until(lambda: d.uplinks.connected() == {"d0": 10})
        _, second = await _uplink(d, m.UplinkHello("d0", 10))     # replaces the first
        assert await asyncio.wait_for(first.read(), 5) == b""     # closed by the router
        await asyncio.sleep(0.2)
        assert "d0" in d.registry.nodes
        d.handlers.handle("d0", m.UplinkSwitch("d0", 10), b"")
        # the node restarts (pid 11) before its old uplink's end reaches the router
        d.handlers.handle("d0", register_message("d0", pid=11), b"")
        second.close()
        await asyncio.sleep(0.2)
        assert d.registry.nodes["d0"].info.pid == 11
        _, third = await _uplink(d, m.UplinkHello("d0", 11))
        d.handlers.handle("d0", m.UplinkSwitch("d0", 11), b"")
        await _until(lambda: d.uplinks.connected() == {"d0": 11})
        third.close()                         # the current incarnation's uplink: lost
        await _until(lambda: "d0" not in d.registry.nodes)
        assert d.lost == {"d0": "decode"}
    _router_scenario(body)


def test_an_uplink_must_begin_with_its_hello():
    async def body(d):
        reader, w = await _uplink(d, m.Drain("d0"))
        assert await asyncio.wait_for(reader.read(), 5) == b""     # cut by the router
        _, w2 = await _uplink(d, m.UplinkHello("d0", 10), register_message("d0", pid=99))
        d.handlers.handle("d0", m.UplinkSwitch("d0", 10), b"")
        await asyncio.sleep(0.2)              # a Register on the uplink is dropped
        assert d.registry.nodes["d0"].info.pid == 10 and d.uplinks.connected() == {"d0": 10}
        w.close()
        w2.close()
    _router_scenario(body)


def test_the_router_writes_on_the_uplink_of_a_node_that_reads_it():
    async def body(d):
        send = functools.partial(Dispatcher.send, d)      # the real send, not the recorder
        reader, w = await _uplink(d, m.UplinkHello("d0", 10, downlink=True))
        await _until(lambda: d.uplinks.connected() == {"d0": 10})
        assert not d.uplinks.send("d0", m.encode(m.Abort("early")))   # not released yet
        d.handlers.handle("d0", m.UplinkSwitch("d0", 10), b"")
        port = w.get_extra_info("sockname")[1]
        assert d.sent[-1] == ("d0", m.DownlinkSwitch("d0", port))      # control socket
        assert send("d0", m.Abort("r1")) and send("d0", m.Abort("r2"))
        frames = FrameReader()
        got: list = []
        while len(got) < 2:
            got += [m.decode(f) for f in frames.feed(await asyncio.wait_for(reader.read(4096), 5))]
        assert got == [m.Abort("r1"), m.Abort("r2")]
        w.close()
        await _until(lambda: not d.uplinks.connected())
        assert not d.uplinks.send("d0", m.encode(m.Abort("r3")))       # ended: control socket
        # a node whose hello does not offer the downlink (an older node) never gets one
        d.handlers.handle("d0", register_message("d0", pid=11), b"")
        _, w2 = await _uplink(d, m.UplinkHello("d0", 11))
        d.handlers.handle("d0", m.UplinkSwitch("d0", 11), b"")
        await _until(lambda: d.uplinks.connected() == {"d0": 11})
        assert not any(isinstance(msg, m.DownlinkSwitch) and msg.port != port
                       for _, msg in d.sent)
        assert not d.uplinks.send("d0", m.encode(m.Abort("r4")))
        w2.close()
    _router_scenario(body)


# ---------------------------------------------------------------- the node's side

class _Listener:
    """A plain TCP listener standing in for the router's uplink port."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def accept(self) -> tuple[socket.socket, FrameReader]:
        self.sock.settimeout(30)
        conn, _ = self.sock.accept()
        conn.settimeout(30)
        return conn, FrameReader()

    def close(self) -> None:
        self.sock.close()


def _read_until(conn: socket.socket, reader: FrameReader, kind, where=lambda msg: True):
    """Decoded frames from ``conn`` up to the first ``kind`` matching ``where``."""
    seen = []
    while True:
        data = conn.recv(65536)
        assert data, f"the uplink ended; got {[type(x).__name__ for x in seen]}"
        for frame in reader.feed(data):
            msg = m.decode(frame)
            seen.append(msg)
            if isinstance(msg, kind) and where(msg):
                return seen


def _finished(rid):
    return lambda msg: any(t.rid == rid and t.finished for t in msg.items)


@contextlib.contextmanager
def _node_with_uplink(model: str):
    """:func:`running_node` offered an uplink on a plain listener: yields ``(router,
    server, listener, conn, reader)`` once the node's hello came on ``conn``."""
    listener = _Listener()
    try:
        with running_node(model) as (router, server, stop, drain, thread):
            router.send(m.Registered("decode-0", "router-a", listener.port))
            conn, reader = listener.accept()
            assert m.decode(_read_first(conn, reader)) == \
                m.UplinkHello("decode-0", os.getpid(), downlink=True)
            yield router, server, listener, conn, reader
    finally:
        listener.close()


def test_the_node_sends_on_its_uplink_and_falls_back_when_it_ends(tiny_llama):
    with _node_with_uplink(tiny_llama) as (router, server, listener, conn, reader):
        # unconfirmed: its tokens still take the control socket
        router.send(m.Generate("pre", [5, 6, 7], {**LONG, "max_tokens": 2}, False))
        router.recv(m.StepTokens, where=_finished("pre"))
        router.send(m.UplinkReady("decode-0", os.getpid() + 1))     # not this process's
        router.send(m.UplinkReady("decode-0", os.getpid()))
        switch = router.recv(m.UplinkSwitch)
        assert switch == m.UplinkSwitch("decode-0", os.getpid())
        router.send(m.Generate("a", [5, 6, 7, 8, 9], {**LONG, "max_tokens": 4}, False))
        seen = _read_until(conn, reader, m.StepTokens, _finished("a"))
        assert sum(len(t.new_token_ids) for s in seen if isinstance(s, m.StepTokens)
                   for t in s.items if t.rid == "a") == 4
        router.send(m.Registered("decode-0", "router-a", listener.port))  # a re-ack
        for _ in range(3):                      # what the control socket got meanwhile
            router.recv(m.Heartbeat)
        assert not any(isinstance(x, (m.StepTokens, m.UplinkSwitch, m.UplinkHello))
                       for x in router.got[router.got.index(switch) + 1:])
        (link,) = server.links.links.values()
        uplink = link.uplink
        conn.close()                            # the router's side ends it
        deadline = time.monotonic() + 10
        while link.uplink is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.uplink is None and uplink.closed
        router.send(m.Generate("b", [5, 6, 7], {**LONG, "max_tokens": 3}, False))
        router.recv(m.StepTokens, where=_finished("b"))     # back on the control socket
        router.send(m.Registered("decode-0", "router-b", listener.port))   # new router
        conn2, reader2 = listener.accept()
        hello = m.decode(_read_first(conn2, reader2))
        assert hello == m.UplinkHello("decode-0", os.getpid(), downlink=True)
        router.send(m.UplinkReady("decode-0", os.getpid()))
        router.recv(m.UplinkSwitch)
        router.send(m.Generate("c", [5, 6, 7], {**LONG, "max_tokens": 2}, False))
        _read_until(conn2, reader2, m.StepTokens, _finished("c"))
        conn2.close()


def test_the_node_holds_the_routers_frames_until_their_switch_and_reads_up_to_the_end():
    listener = _Listener()
    up = Uplink("127.0.0.1", listener.port, "d0", 7)
    try:
        conn, reader = listener.accept()
        up.flush()
        assert m.decode(_read_first(conn, reader)) == m.UplinkHello("d0", 7, downlink=True)
        conn.sendall(framed(b"one") + framed(b"two")[:5])
        select.select([up.fd], [], [], 5)
        assert up.receive() == []                           # held until the switch
        assert up.switch_down(up.local_port + 1) is None    # another connection's switch
        conn.sendall(framed(b"two")[5:])
        select.select([up.fd], [], [], 5)
        assert up.receive() == [] and not up.down
        assert up.switch_down(up.local_port) == [b"one", b"two"]
        conn.sendall(framed(b"three"))
        conn.close()
        frames = []
        while not up.broken:
            select.select([up.fd], [], [], 5)
            frames += up.receive()
        assert frames == [b"three"] and up.ended.endswith("ended: the router closed it")
        assert up.receive() == []                           # nothing after the end
    finally:
        up.close()
        listener.close()


def test_the_node_reads_the_routers_messages_on_its_uplink_after_the_switch(tiny_llama):
    with _node_with_uplink(tiny_llama) as (router, server, listener, conn, reader):
        router.send(m.UplinkReady("decode-0", os.getpid()))
        router.recv(m.UplinkSwitch)
        port = conn.getpeername()[1]             # the node's end of the connection

        def generate(rid: str) -> m.Generate:
            return m.Generate(rid, [5, 6, 7], {**LONG, "max_tokens": 2}, False)

        conn.sendall(framed(m.encode(generate("a"))))         # before the switch: held
        router.send(m.DownlinkSwitch("decode-0", port + 1))   # another connection's
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.recv(65536)                                  # "a" did not run
        conn.settimeout(30)
        router.send(generate("b"))               # the control socket, before the switch
        router.send(m.DownlinkSwitch("decode-0", port))
        conn.sendall(framed(m.encode(generate("c"))))         # after it
        seen = []
        for rid in "abc":
            if not any(t.rid == rid and t.finished for x in seen for t in x.items):
                seen += _read_until(conn, reader, m.StepTokens, _finished(rid))
        first = [t.rid for x in seen for t in x.items]
        assert sorted(set(first), key=first.index) == ["b", "a", "c"]   # in sent order
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_uplink_is_tried_again_until_it_opens(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(router_links, "UPLINK_RETRY_S", 0.3)
    caplog.set_level(logging.INFO, logger="disagg.node")
    port = _free_port()                          # nothing listens there (yet)
    with running_node(tiny_llama) as (router, server, stop, drain, thread):
        (link,) = server.links.links.values()
        t0 = time.monotonic()
        router.send(m.Registered("decode-0", "router-a", port))
        deadline = time.monotonic() + 10
        while link._retry_s < 1.2 and time.monotonic() < deadline:    # 0.3 → 0.6 → 1.2
            time.sleep(0.01)
        assert link._retry_s == 1.2 and link.uplink is None, link._retry_s
        assert time.monotonic() - t0 >= 0.3      # the second try waited for its turn
        # meanwhile the node serves on its control socket
        router.send(m.Generate("a", [5, 6, 7], {**LONG, "max_tokens": 2}, False))
        router.recv(m.StepTokens, where=_finished("a"))
        listener = socket.create_server(("127.0.0.1", port))
        try:
            listener.settimeout(30)
            conn, _ = listener.accept()          # the next try (at most 1.2 s away)
            conn.settimeout(30)
            reader = FrameReader()
            assert m.decode(_read_first(conn, reader)) == \
                m.UplinkHello("decode-0", os.getpid(), downlink=True)
            router.send(m.UplinkReady("decode-0", os.getpid()))
            router.recv(m.UplinkSwitch)
            router.send(m.Generate("b", [5, 6, 7], {**LONG, "max_tokens": 2}, False))
            _read_until(conn, reader, m.StepTokens, _finished("b"))
            assert link._retry_at is None and link._retry_s == 0.3     # reset by the switch
            conn.close()
        finally:
            listener.close()
    refusals = [r for r in caplog.records if "no uplink at port" in r.getMessage()]
    assert refusals and refusals[0].levelname == "WARNING"
    assert all(r.levelname == "INFO" for r in refusals[1:])         # warned once


def test_an_uplink_connects_without_blocking_and_gives_up_in_time(monkeypatch):
    # a listener whose backlog is full answers no SYN: the connection hangs like one
    # to a port that drops packets
    monkeypatch.setattr(node_uplink, "CONNECT_TIMEOUT_S", 0.5)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(8):                       # fill the accept queue
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(full.getsockname())
            fillers.append(c)
        time.sleep(0.2)
        t0 = time.monotonic()
        up = Uplink("127.0.0.1", full.getsockname()[1], "d0", 1)
        assert time.monotonic() - t0 < 0.2       # begun, not waited for
        if up.connected:
            pytest.skip("this kernel completed a connect to a full backlog")
        assert up.pending > 0                    # the hello waits for the connection
        with pytest.raises(UplinkClosed, match="cannot connect"):
            while time.monotonic() - t0 < 5:
                up.flush()
                time.sleep(0.01)
        assert up.broken and up.connect_failed and time.monotonic() - t0 >= 0.5
        up.close()
    finally:
        for c in fillers:
            c.close()
        full.close()


def _read_first(conn: socket.socket, reader: FrameReader) -> bytes:
    frames: list[bytes] = []
    while not frames:
        data = conn.recv(65536)
        assert data, "the uplink ended before its first frame"
        frames = reader.feed(data)
    return frames[0]


def test_the_writer_never_blocks_and_refuses_past_its_limit(monkeypatch):
    monkeypatch.setattr(node_uplink, "MAX_BUFFERED_BYTES", 8 << 20)
    listener = _Listener()
    try:
        up = Uplink("127.0.0.1", listener.port, "d0", 1)
        conn, reader = listener.accept()            # accepted, and not read yet
        frame = b"x" * 65536
        t0, sent = time.monotonic(), 0
        while up.send(frame):
            sent += 1
            assert sent < 1000, "never refused"
        assert time.monotonic() - t0 < 5 and up.pending > 0
        got = 0
        while got < sent + 1:                       # the hello, then every frame in order
            got += len(reader.feed(conn.recv(1 << 20)))
            up.flush()
        assert up.pending == 0 and up.send(frame)
        conn.close()
        with pytest.raises(UplinkClosed):
            for _ in range(100):                    # the peer is gone: a write fails soon
                up.send(frame)
                time.sleep(0.01)
        assert up.broken
        up.close()
    finally:
        listener.close()
