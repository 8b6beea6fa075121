"""Is a sender's link to a decode rank alive? Heartbeats on a side connection, plus socket events.

A transfer must fail fast when its receiver dies, is stopped, or the network
between the two hosts is cut (a blackhole route sends no FIN or RST, so the
data socket alone never notices). Each link therefore has, next to its data
DEALER, an idle *beat* DEALER to the same endpoint that carries ZMTP heartbeats
(``ZMQ_HEARTBEAT_IVL`` / ``_TIMEOUT`` / ``_TTL``)::

    sender process                                 receiver process
    data DEALER ══ HELLO, KV frames ═══════════▶  ROUTER ── app reads when it polls
                ◀═ HELLO, ACK / ERROR ══════════
    beat DEALER ── PING every heartbeat_s ─────▶  (same ROUTER: its libzmq I/O
                ◀─ PONG ───────────────────────   thread answers, the app never sees it)

The receiver's I/O thread answers a PING even while its engine is busy in a
long step, so busy is not dead; a stopped or killed process or a cut link
answers nothing, and libzmq drops the beat connection ``heartbeat_timeout_s``
after the first unanswered ping. Why a separate connection: libzmq queues a
PING only between two messages, so on a data connection stuck in the middle
of a large KV frame (the peer stopped reading) no PING would ever be sent,
and behind megabytes of queued frames on a slow link a PING's answer could
take longer than the timeout and kill a healthy link.

Both sockets are watched with ``zmq_socket_monitor``: the link is up once both
ZMTP handshakes succeeded (that is the peer's I/O thread, not its engine,
answering) and must be up ``connect_timeout_s`` after it was opened; a
disconnect of either socket (heartbeat timeout, or the peer closed) or a failed
handshake ends it. :meth:`LinkWatch.check` raises the reason; the sender then
drops the link, failing its transfers, and the next transfer reconnects.
"""

from __future__ import annotations

import math
import time
import uuid

import zmq
from zmq.utils.monitor import parse_monitor_message

from .base import TransportConfig, TransportError, TransportTimeout

EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
KEEPALIVE_PROBES = 3


def set_heartbeat(sock: zmq.Socket, config: TransportConfig) -> None:
    """Ping the peer every ``heartbeat_s``; drop the connection after ``heartbeat_timeout_s``
    without any answer. The TTL asks the peer to drop it too if the pings stop arriving."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(1000 * config.heartbeat_s)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(1000 * config.heartbeat_timeout_s)))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, round(1000 * config.heartbeat_timeout_s)))


def set_keepalive(sock: zmq.Socket, config: TransportConfig) -> None:
    """TCP keepalive (kernel-level, tcp:// only), so a half-open connection to a host that
    vanished behind a cut link is eventually closed. Not the failure detector: a stopped
    process's kernel still answers keepalive probes."""
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, math.ceil(config.heartbeat_timeout_s)))
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, math.ceil(config.heartbeat_s)))
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)


class LinkWatch:
    """Liveness of one sender → decode-rank link: owns the beat socket and both monitors.

    ``data`` is the link's (configured, not yet connected) data socket and
    ``beat`` a fresh DEALER configured the same way (CURVE keys); the watch
    connects both to ``endpoint``. :meth:`close` closes the beat socket and
    the monitors; the data socket stays the caller's to close.
    """

    def __init__(self, data: zmq.Socket, beat: zmq.Socket, endpoint: str,
                 config: TransportConfig) -> None:
        self.endpoint, self.config = endpoint, config
        self.deadline = time.monotonic() + config.connect_timeout_s
        set_heartbeat(beat, config)
        self._data, self._beat = data, beat
        self._monitors: dict[zmq.Socket, tuple[zmq.Socket, str]] = {}
        for sock, role in ((data, "data"), (beat, "heartbeat")):
            mon = sock.get_monitor_socket(EVENTS, f"inproc://disagg-kv-link-{uuid.uuid4().hex}")
            self._monitors[mon] = (sock, role)
        self._up: set[str] = set()
        try:
            beat.connect(endpoint)
            data.connect(endpoint)
        except zmq.ZMQError as exc:    # a malformed endpoint (it came in a control message)
            self.close()
            raise TransportError(f"cannot connect to {endpoint!r}: {exc}") from None

    @property
    def monitors(self) -> list[zmq.Socket]:
        """The monitor sockets, to wake a poller when the link changes."""
        return list(self._monitors)

    @property
    def up(self) -> bool:
        """Whether both connections completed their ZMTP handshake (the peer is reachable)."""
        return len(self._up) == 2

    def check(self, now: float | None = None) -> None:
        """Read pending socket events; raise :class:`TransportError` if the link is dead.

        :class:`TransportTimeout` when the link did not come up within
        ``connect_timeout_s``.
        """
        for mon, (_, role) in self._monitors.items():
            while True:
                try:
                    event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))["event"]
                except zmq.Again:
                    break
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._up.add(role)
                elif event == zmq.EVENT_DISCONNECTED and role == "heartbeat":
                    raise TransportError(
                        f"{self.endpoint} stopped answering heartbeats for "
                        f"{self.config.heartbeat_timeout_s:.3g} s or closed the connection "
                        f"(receiver stopped or gone, or the link is cut)")
                elif event == zmq.EVENT_DISCONNECTED:
                    raise TransportError(f"{self.endpoint} closed the connection (receiver gone?)")
                else:
                    raise TransportError(f"ZeroMQ handshake with {self.endpoint} failed "
                                         f"({event.name}); a KV receiver with the same CURVE key?")
        if not self.up and (time.monotonic() if now is None else now) >= self.deadline:
            raise TransportTimeout(
                f"no connection to {self.endpoint} within {self.config.connect_timeout_s:.3g} s "
                f"(HELLO not delivered: receiver unreachable, stopped, or not a KV receiver)")

    def close(self) -> None:
        """Stop monitoring; close the beat socket and the monitors (not the data socket)."""
        for mon, (sock, _) in self._monitors.items():
            if not sock.closed:
                sock.disable_monitor()
            mon.close(linger=0)
        self._monitors.clear()
        self._beat.close(linger=0)
