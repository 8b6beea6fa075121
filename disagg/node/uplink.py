"""A node's uplink to one router: the TCP connection its messages take once registered.

The router's side, and why, are in :mod:`router.uplinks`. Here the node's loop
thread writes each frame (:mod:`disagg.control.framing`) straight into the
kernel: the socket is non-blocking, and what the kernel does not take at once
waits in a buffer that every later send and :meth:`Uplink.flush` push on, so
a router that reads slowly never stalls the engine loop. Past
``MAX_BUFFERED_BYTES`` waiting, a send is refused (the caller logs the drop),
as the control socket refuses a send past its high-water mark.

The same connection brings the router's messages the other way (the node says
so in its hello): the loop thread reads them when the socket turns readable
(:meth:`Uplink.receive`), and holds them until the router's ``DownlinkSwitch``
for this connection came on the control socket (:meth:`Uplink.switch_down`),
so they follow everything the router sent there before. End of stream, or
bytes that cannot be frames, end the uplink. A failed write or read marks the
uplink ``broken``; its owner closes it (after taking its descriptor out of any
poller).

Connecting never blocks either: the connection is begun, the hello waits in the
buffer, and each later send or flush first checks whether it is made. One not
made within ``CONNECT_TIMEOUT_S`` (a port that drops packets), or refused, is
``broken`` while never ``connected`` (:attr:`Uplink.connect_failed`), so its owner
can try again later (:meth:`disagg.node.router_links.RouterLink.tend_uplink`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from disagg.control import messages as m
from disagg.control.framing import FrameReader, framed

log = logging.getLogger("disagg.node")

MAX_BUFFERED_BYTES = 64 << 20   # written, not yet taken by the kernel; also the most
                                # read and held before the router's DownlinkSwitch
CONNECT_TIMEOUT_S = 2.0     # an uplink not connected by then has failed


class UplinkClosed(ConnectionError):
    """The uplink ended (the router closed it or the connection broke)."""


class Uplink:
    """One uplink (``host``, ``port``): connecting, then connected and introduced with
    ``UplinkHello``.

    Raises ``OSError`` when the connection cannot even be begun (``host`` must be an IP
    address: nothing here waits for DNS). Use from one thread (the node's loop).
    """

    def __init__(self, host: str, port: int, node_id: str, pid: int) -> None:
        self.host, self.port = host, port
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = self.sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            self.sock.close()
            raise OSError(err, os.strerror(err))
        #: the connection is made (until then frames wait in the buffer)
        self.connected = err == 0
        self._connect_by = time.monotonic() + CONNECT_TIMEOUT_S
        #: the socket's descriptor (poll it for reading: the router's frames, or its end)
        self.fd: int = self.sock.fileno()
        self._out = bytearray(framed(m.encode(m.UplinkHello(node_id, pid, downlink=True))))
        self._reader = FrameReader()
        self._held: list[bytes] = []    # the router's frames before its DownlinkSwitch
        self._held_bytes = 0
        #: the router's DownlinkSwitch for this connection was handled
        self.down = False
        #: how it ended, once :meth:`receive` found it ended (``broken`` is then set)
        self.ended: str | None = None
        #: the router confirmed the hello (``UplinkReady``): messages may take it
        self.ready = False
        self.broken = False         # set on a failed write or read; the owner closes it
        self.closed = False
        try:
            self.flush()
        except UplinkClosed:
            self.sock.close()
            raise

    @property
    def connect_failed(self) -> bool:
        """It broke before its connection was made (refused, or not within
        ``CONNECT_TIMEOUT_S``): worth trying again, unlike one that was made and ended."""
        return self.broken and not self.connected

    @property
    def pending(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return len(self._out)

    def send(self, frame: bytes) -> bool:
        """Write ``frame`` (never blocks); False when too much already waits. Raises
        :class:`UplinkClosed` when the connection broke."""
        if self.broken or self.closed:
            raise UplinkClosed(f"the uplink to {self.host}:{self.port} is closed")
        data = framed(frame)
        if self._out or not self.connected:
            if len(self._out) + len(data) > MAX_BUFFERED_BYTES:
                return False
            self._out += data
            self.flush()
            return True
        sent = self._write(data)
        if sent < len(data):
            self._out += memoryview(data)[sent:]
        return True

    def flush(self) -> None:
        """Push on what waits (no-op when nothing does, or while still connecting);
        :class:`UplinkClosed` if broken."""
        if self._out and self._made():
            del self._out[:self._write(self._out)]

    def _made(self) -> bool:
        """Whether the connection is made; :class:`UplinkClosed` if it failed."""
        if self.connected:
            return True
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            try:
                self.sock.getpeername()
                self.connected = True
                return True
            except OSError:                       # still connecting
                if time.monotonic() < self._connect_by:
                    return False
                err = errno.ETIMEDOUT
        self.broken = True
        raise UplinkClosed(f"cannot connect the uplink to {self.host}:{self.port}: "
                           f"{os.strerror(err)}")

    def _write(self, data) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.broken = True
            raise UplinkClosed(f"the uplink to {self.host}:{self.port} broke: {exc}") from None

    @property
    def local_port(self) -> int:
        """This end's TCP port (what the router's ``DownlinkSwitch`` names)."""
        return self.sock.getsockname()[1]

    def receive(self) -> list[bytes]:
        """The socket polled readable: the router's frames that came, in order (none
        before its ``DownlinkSwitch``: those are held). When the stream ended (or brought
        bytes that are not frames, or failed) the uplink is ``broken`` and :attr:`ended`
        says why; frames read before the end are still returned. Raises
        :class:`UplinkClosed` when its connection could not be made."""
        if not self._made():
            return []
        frames: list[bytes] = []
        while self.ended is None:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._end(str(exc))
                break
            if not data:
                self._end("the router closed it")
                break
            try:
                frames += self._reader.feed(data)
            except m.ControlError as exc:
                self._end(str(exc))
            if len(data) < 1 << 16:       # drained (a further recv would only say so)
                break
        if self.down:
            return frames
        self._held += frames
        self._held_bytes += sum(map(len, frames))
        if self._held_bytes > MAX_BUFFERED_BYTES and self.ended is None:
            self._end(f"over {MAX_BUFFERED_BYTES} bytes came before DownlinkSwitch")
        return []

    def _end(self, why: str) -> None:
        self.ended = f"the uplink to {self.host}:{self.port} ended: {why}"
        self.broken = True

    def switch_down(self, port: int) -> list[bytes] | None:
        """The router's ``DownlinkSwitch`` for the connection from ``port``: what this
        uplink brought so far, in order, and its later frames straight from
        :meth:`receive`. None when ``port`` is not this connection's (an older one's)."""
        if port != self.local_port:
            return None
        self.down = True
        held, self._held, self._held_bytes = self._held, [], 0
        return held

    def close(self, linger_ms: int = 0) -> None:
        """Close, first waiting up to ``linger_ms`` for what waits to leave (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.broken or not self.connected:
            self._out.clear()
        deadline = time.monotonic() + linger_ms / 1000
        try:
            while self._out and time.monotonic() < deadline:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                del self._out[:self.sock.send(self._out)]
        except OSError:
            pass
        if self._out:
            log.warning("closed the uplink to %s:%d with %d byte(s) unsent", self.host,
                        self.port, len(self._out))
        self.sock.close()
