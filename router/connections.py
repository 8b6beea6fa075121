"""Instant notice that a node's control connection ended (its process died).

The heartbeat timeout (``node_timeout_s``) finds a silent node after seconds; a
node whose process ends closes its TCP connection at once. ZeroMQ's socket
monitor reports that end (``EVENT_DISCONNECTED``) with the connection's file
descriptor, and every received message carries the descriptor it came on
(``zmq.SRCFD``), so the router learns the descriptor of each node's main
socket from its ``Register`` (:meth:`ConnectionWatch.note`) and maps an end
back to the node. ``ZMQ_ROUTER_NOTIFY``, which would put the peer's identity
in the notice itself, is a draft API that pyzmq's bundled libzmq lacks.

A descriptor number comes back for a later connection once closed. The monitor
reports a connection's end before its descriptor is closed, so before a later
connection on the same number is accepted or can send anything; ``note`` reads
every pending event before it maps a descriptor, so the end of a previous
connection never hits the node that now holds the number. A node's ``hb:``
heartbeat socket never registers, so its end is not mapped to anything.

A node that is alive but whose connection dropped (ZeroMQ reconnects by
itself) is treated as lost as well: its requests move on, and its next
heartbeat gets ``RegisterAgain``, so it registers again on the new connection.

A node restarted under the same id connects with the identity of a connection
the router may still hold (a host that vanished leaves it half open). The
control socket sets ``ZMQ_ROUTER_HANDOVER``, so the new connection takes the
identity over at once; the old one is cut without a disconnect event, and the
new ``Register`` (another pid) recovers the old incarnation's requests
(``ControlHandlers.register``). Two live processes under one id: the newer wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("disagg.router")


class ConnectionWatch:
    """Calls ``on_lost(node_id)`` when a node's registered connection on ``sock`` ends."""

    def __init__(self, sock: zmq.asyncio.Socket, on_lost: Callable[[str], None]) -> None:
        self._sock = sock
        self._on_lost = on_lost
        address = f"inproc://disagg-router-monitor-{id(self):x}"
        sock.monitor(address, zmq.EVENT_DISCONNECTED)
        # read without waiting (``note``) through a plain socket; wait through its
        # asyncio twin (same libzmq socket) in ``run``
        self._events = zmq.Socket(sock.context, zmq.PAIR)
        self._events.setsockopt(zmq.LINGER, 0)
        self._events.connect(address)
        self._wait = zmq.asyncio.Socket.from_socket(self._events)
        self._node_of: dict[int, str] = {}      # descriptor → node id
        self._fd_of: dict[str, int] = {}        # node id → descriptor

    def note(self, node_id: str, fd: int) -> None:
        """``node_id`` registers on the connection with descriptor ``fd`` (< 0: none, as
        over inproc: nothing to watch)."""
        self.drain()
        if fd < 0:
            return
        old = self._fd_of.pop(node_id, None)
        if old is not None:
            self._node_of.pop(old, None)
        stale = self._node_of.pop(fd, None)
        if stale is not None:
            self._fd_of.pop(stale, None)
        self._node_of[fd] = node_id
        self._fd_of[node_id] = fd

    def drain(self) -> None:
        """Act on every connection end reported so far (never waits)."""
        while True:
            try:
                event = parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            node_id = self._node_of.pop(int(event["value"]), None)
            if node_id is None:
                continue
            del self._fd_of[node_id]
            try:
                self._on_lost(node_id)
            except Exception:           # a bug there must not stop the watch
                log.exception("error handling the end of node %s's connection", node_id)

    async def run(self) -> None:
        """Wait for connection ends and act on them (a task on the serving loop)."""
        while True:
            await self._wait.poll(flags=zmq.POLLIN)
            self.drain()

    def close(self) -> None:
        """Stop monitoring and close the event socket (before the context is terminated)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._wait.close(0)
        self._events.close(0)
