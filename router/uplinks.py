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
what :mod:`router.connections` watches.

The router's messages to the node (``Generate``, ``Prefill``, ``Abort``, …) take
the same connection the other way once the node's hello said it reads them
(``downlink``): the event loop writes them to the socket itself, where a ZeroMQ
send hands each to the I/O thread (measured ~125-210 us of the request's
dispatch on 2 cores, ``disagg bench router``), and the node's loop thread reads
them without its own I/O thread in between.

Opening one, in order::

    router ─Registered(uplink_port)─▶ node          (control socket)
    node ═UplinkHello(node, pid)═▶ router            (the new uplink's first frame)
    router ─UplinkReady(node, pid)─▶ node           (control socket: it reached me)
    node ─UplinkSwitch(node, pid)─▶ router          (the control socket's last message)
    node ═everything else═▶ router                   (the uplink from then on)
    router ─DownlinkSwitch(node, port)─▶ node       (if the hello said downlink: the
    router ═everything else═▶ node                   router's last control message)

A node sends nothing but its hello on an uplink the router has not confirmed, so a
wrong port (whatever listens there) never swallows its messages.

The router holds what an uplink brings until that uplink's ``UplinkSwitch`` has been
handled (and with it every message the node sent on the control socket before), so a
request's messages are handled in the order the node sent them, whichever way each
came. The node, in turn, holds what the router writes on the uplink until the
``DownlinkSwitch`` naming that connection (by the node's local port) has come on the
control socket. An uplink that ends while its node is registered under the same pid
counts as the node's connection ending (its requests move on, as for
``router.connections``); both sides go back to the control socket, and the node
registers again when asked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from disagg.control import messages as m
from disagg.control.framing import FrameReader, framed

log = logging.getLogger("disagg.router")

NOT_ON_UPLINK = (m.Register, m.UplinkHello, m.UplinkSwitch)    # control socket only
MAX_HELD_BYTES = 64 << 20   # an uplink whose switch never comes is cut past this much held,
                            # or one whose node does not read past this much written


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
        self.downlink = False                # its hello said the node reads this way too
        self.down = False                    # DownlinkSwitch sent: the router writes here

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
    ends while the router runs; ``on_downlink(node_id, port)`` when a released uplink's
    node reads it too: the router says ``DownlinkSwitch`` on the control socket, and
    :meth:`send` writes to that node here from then on.
    """

    def __init__(self, host: str, port: int, handle: Callable[[str, object, bytes], None],
                 on_hello: Callable[[str, int], None],
                 on_lost: Callable[[str, int], None],
                 on_downlink: Callable[[str, int], None]) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"the uplink port must be in [0, 65535], got {port}")
        self.handle, self.on_hello, self.on_lost = handle, on_hello, on_lost
        self.on_downlink = on_downlink
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
        uplink.node_id, uplink.pid, uplink.downlink = msg.node_id, msg.pid, msg.downlink
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
        if uplink.downlink and not uplink.transport.is_closing():    # it is the current one
            self.on_downlink(uplink.node_id, uplink.transport.get_extra_info("peername")[1])
            uplink.down = True

    def send(self, node_id: str, frame: bytes) -> bool:
        """Write ``frame`` to ``node_id`` on its uplink; False when it has none the node
        reads (the caller uses the control socket). An uplink the node does not drain
        (``MAX_HELD_BYTES`` waiting) is closed, which counts as the node's end."""
        uplink = self._current.get(node_id)
        if uplink is None or not uplink.down or uplink.transport.is_closing():
            return False
        if uplink.transport.get_write_buffer_size() > MAX_HELD_BYTES:
            log.error("closed the uplink of %s: over %d bytes written and not read",
                      node_id, MAX_HELD_BYTES)
            uplink.transport.close()
            return False
        uplink.transport.write(framed(frame))
        return True

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
