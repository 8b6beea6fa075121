"""Node uplinks: a plain TCP connection per node for its messages to the router.

A message on the control socket (ZeroMQ) crosses two extra threads: the node's
ZeroMQ I/O thread sends it, the router's receives it and wakes the event loop.
On a loaded machine each of those threads waits for a core the engine is
computing on (the hop measured 0.7 ms p50 with 32 streams on 2 cores; between two
idle processes a ZeroMQ round trip took 1,084 us there, a plain TCP one 124 us).
Tokens are most of what nodes send, and every token pays that hop, so once
registered a node sends its messages — tokens,
KV targets, rejections, ``Drain``, ``Deregister`` — on an uplink: a TCP
connection to this listener, written by the node's loop thread itself and read
by the router's event loop (frames as in :mod:`disagg.control.framing`).
``Register`` and heartbeats stay on the control socket, whose connection is
what :mod:`router.connections` watches; everything the router sends goes there
too.

Opening one, in order::

    router ─Registered(uplink_port)─▶ node          (control socket)
    node ═UplinkHello(node, pid)═▶ router            (the new uplink's first frame)
    router ─UplinkReady(node, pid)─▶ node           (control socket: it reached me)
    node ─UplinkSwitch(node, pid)─▶ router          (the control socket's last message)
    node ═everything else═▶ router                   (the uplink from then on)

A node sends nothing but its hello on an uplink the router has not confirmed, so a
wrong port (whatever listens there) never swallows its messages.

The router holds what an uplink brings until that uplink's ``UplinkSwitch`` has been
handled (and with it every message the node sent on the control socket before), so a
request's messages are handled in the order the node sent them, whichever way each
came. An uplink that ends while its node is registered under the same pid counts as
the node's connection ending (its requests move on, as for ``router.connections``);
the node goes back to its control socket, and registers again when asked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from disagg.control import messages as m
from disagg.control.framing import FrameReader

log = logging.getLogger("disagg.router")

NOT_ON_UPLINK = (m.Register, m.UplinkHello, m.UplinkSwitch)    # control socket only
MAX_HELD_BYTES = 64 << 20   # an uplink whose switch never comes is cut past this much held


class _Uplink(asyncio.Protocol):
    """One node's uplink: frames in, handed on once its switch has been seen."""

    def __init__(self, owner: "Uplinks") -> None:
        self.owner = owner
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.node_id: str | None = None      # from its UplinkHello
        self.pid = 0
        self.released = False                # its UplinkSwitch was handled
        self.held: list[tuple[object, bytes]] = []
        self.held_bytes = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except m.ControlError as exc:
            log.error("closed the uplink of %s: %s", self.node_id or "an unnamed node", exc)
            self.transport.close()
            return
        for frame in frames:
            try:
                msg = m.decode(frame)
            except m.ControlError as exc:
                log.error("dropped a malformed frame on the uplink of %s: %s",
                          self.node_id or "an unnamed node", exc)
                continue
            if self.node_id is None:
                if not isinstance(msg, m.UplinkHello):
                    log.error("closed an uplink that began with %s, not UplinkHello",
                              type(msg).__name__)
                    self.transport.close()
                    return
                self.owner.hello(self, msg)
            elif isinstance(msg, NOT_ON_UPLINK):
                log.error("node %s sent %s on its uplink (it belongs on the control "
                          "socket); dropped", self.node_id, type(msg).__name__)
            elif self.released:
                self.owner.handle(self.node_id, msg, frame)
            else:
                self.held.append((msg, frame))
                self.held_bytes += len(frame)
                if self.held_bytes > MAX_HELD_BYTES:
                    log.error("closed the uplink of %s: %d bytes held and no UplinkSwitch "
                              "for it", self.node_id, self.held_bytes)
                    self.transport.close()
                    return

    def connection_lost(self, exc) -> None:
        self.owner.ended(self)


class Uplinks:
    """The router's uplink listener (bound at construction, serving from :meth:`serve`).

    ``handle(node_id, msg, frame)`` gets every message, in order, once its uplink is
    released; ``on_hello(node_id, pid)`` is called for each uplink's hello (the router
    answers ``UplinkReady``); ``on_lost(node_id, pid)`` is called when a released uplink
    ends while the router runs.
    """

    def __init__(self, host: str, port: int, handle: Callable[[str, object, bytes], None],
                 on_hello: Callable[[str, int], None],
                 on_lost: Callable[[str, int], None]) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"the uplink port must be in [0, 65535], got {port}")
        self.handle, self.on_hello, self.on_lost = handle, on_hello, on_lost
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=128)
        self.sock.setblocking(False)
        #: the bound port (a 0 resolved)
        self.port: int = self.sock.getsockname()[1]
        self._current: dict[str, _Uplink] = {}   # node id → its latest uplink
        self._switched: dict[str, int] = {}      # node id → pid whose switch came first
        self._closing = False

    async def serve(self) -> None:
        """Accept uplinks until cancelled (a task on the serving loop)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Uplink(self), sock=self.sock)
        try:
            await server.serve_forever()
        finally:
            server.close()

    def hello(self, uplink: _Uplink, msg: m.UplinkHello) -> None:
        """``uplink`` says whose it is; it replaces that node's previous one."""
        uplink.node_id, uplink.pid = msg.node_id, msg.pid
        old = self._current.get(msg.node_id)
        self._current[msg.node_id] = uplink
        if old is not None:
            log.info("node %s opened a new uplink (pid %d); closing the one of pid %d",
                     msg.node_id, msg.pid, old.pid)
            old.transport.close()
        if self._switched.get(msg.node_id) == msg.pid:
            del self._switched[msg.node_id]
            self._release(uplink)
        self.on_hello(msg.node_id, msg.pid)

    def switch(self, node_id: str, pid: int) -> None:
        """``UplinkSwitch`` handled: what ``node_id``'s uplink of ``pid`` brought is next."""
        uplink = self._current.get(node_id)
        if uplink is not None and uplink.pid == pid:
            self._release(uplink)
        else:                                   # its hello is still on the way
            self._switched[node_id] = pid

    def _release(self, uplink: _Uplink) -> None:
        uplink.released = True
        held, uplink.held, uplink.held_bytes = uplink.held, [], 0
        for msg, frame in held:
            self.handle(uplink.node_id, msg, frame)

    def ended(self, uplink: _Uplink) -> None:
        """``uplink`` closed (either side)."""
        if uplink.node_id is None or self._current.get(uplink.node_id) is not uplink:
            return                               # unnamed, or replaced by a newer one
        del self._current[uplink.node_id]
        if uplink.held:
            log.warning("node %s's uplink ended with %d message(s) waiting for its switch; "
                        "dropped", uplink.node_id, len(uplink.held))
        if uplink.released and not self._closing:
            self.on_lost(uplink.node_id, uplink.pid)

    def connected(self) -> dict[str, int]:
        """Node id → pid of every node's current uplink."""
        return {node_id: u.pid for node_id, u in self._current.items()}

    def close(self) -> None:
        """Close the listener and every uplink (no node counts as lost for it)."""
        self._closing = True
        for uplink in list(self._current.values()):
            uplink.transport.close()
        self.sock.close()
