"""A node's routers: which addresses it registers with, and one link per router.

``--router`` is a comma-separated list of ``tcp://HOST:PORT`` (or ``ipc://PATH``)
addresses. A HOST that is a DNS name stands for every address it resolves to — a
Kubernetes headless Service names every router replica that way — and is looked up
again every ``resolve_s`` seconds by a background thread (a lookup never blocks the
engine loop)::

    "tcp://disagg-router-control:7100"  ─resolve─▶  tcp://10.1.0.7:7100, tcp://10.1.3.2:7100
                                                     (one RouterLink, one Register each)

An address that appears gets a link; one missing from the answers for
``FORGET_AFTER_S`` (longer than a router's HTTP drain) is dropped, and the node aborts
the requests its router had sent. A failed lookup changes nothing. IPv4 answers are
preferred when a name has both.

Which link a message takes (:meth:`RouterLinks.owner`): node-wide messages (Register,
Drain, Deregister) go to every link; a request's messages go to the router that sent
it. Every router ends its request ids with ``-`` and the first 8 hex digits of its
process id (``router/dispatch.py``), which ``Registered.router_id`` tells the node, so
the owner is found from the id alone — no table to leak. With one link everything
goes to it (request ids of any form).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import zmq

from disagg.control import messages as m
from disagg.node.uplink import Uplink, UplinkClosed

log = logging.getLogger("disagg.node")

FORGET_AFTER_S = 120.0      # an address gone from DNS this long is a router gone for good
UPLINK_RETRY_S = 1.0        # after an uplink's connection failed, try again after this long,
UPLINK_RETRY_MAX_S = 30.0   # doubling up to this
TAG_LEN = 8                 # request ids end with "-" + the router id's first TAG_LEN chars


@dataclass(frozen=True)
class RouterEntry:
    """One entry of ``--router``: ``address`` as given; ``host`` / ``port`` set when it
    is a tcp:// address whose host is a DNS name (resolved to every address)."""

    address: str
    host: str = ""
    port: int = 0

    @property
    def is_name(self) -> bool:
        """Whether this entry is resolved (a DNS name) rather than used as given."""
        return bool(self.host)


def parse_routers(spec: str) -> list[RouterEntry]:
    """``--router``'s value as entries; raises ``ValueError`` on a malformed one."""
    entries = []
    for raw in (s.strip() for s in (spec or "").split(",")):
        if not raw:
            continue
        if raw.startswith("ipc://"):
            entries.append(RouterEntry(raw))
            continue
        if not raw.startswith("tcp://"):
            raise ValueError(f"a router address must be tcp://HOST:PORT or ipc://PATH, "
                             f"got {raw!r}")
        try:
            parts = urlsplit(raw)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"bad router address {raw!r}: {exc}") from None
        if not host or port is None or parts.path not in ("", "/"):
            raise ValueError(f"a router address must be tcp://HOST:PORT, got {raw!r}")
        try:
            ipaddress.ip_address(host)
            entries.append(RouterEntry(raw))
        except ValueError:                       # not an IP literal: a name to resolve
            entries.append(RouterEntry(raw, host=host, port=port))
    if not entries:
        raise ValueError("no router address: pass --router tcp://HOST:PORT[,...] or set "
                         "DISAGG_ROUTER")
    return entries


def resolve(entry: RouterEntry) -> list[str]:
    """The addresses ``entry`` stands for; raises ``OSError`` when the lookup fails."""
    if not entry.is_name:
        return [entry.address]
    infos = socket.getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    if v4:
        return [f"tcp://{ip}:{entry.port}" for ip in v4]
    return [f"tcp://[{ip}]:{entry.port}" for ip in v6]


class RouterLink:
    """One router: a control DEALER (identity = the node id), the uplink once open
    (:mod:`disagg.node.uplink`), and what the router said. Both sockets are in
    ``poller`` (for reading) while open.

    ``registered``: it answered the latest Register. ``router_id``: its process id
    (from ``Registered``; "" before). ``register_sent_at``: when Register last left.

    An uplink whose connection cannot be made (refused, or not within
    ``disagg.node.uplink.CONNECT_TIMEOUT_S``) is tried again while the same router
    process offers the same port, after ``UPLINK_RETRY_S`` doubling up to
    ``UPLINK_RETRY_MAX_S``; meanwhile messages take the control socket. One that was
    made and ended is not: the router counts that end as the node's, and its next
    ``Registered`` offers the uplink again.
    """

    def __init__(self, ctx: zmq.Context, node_id: str, address: str,
                 poller: zmq.Poller) -> None:
        self.address, self.poller = address, poller
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        poller.register(self.sock, zmq.POLLIN)
        self.registered = False
        self.router_id = ""
        self.register_sent_at = 0.0
        self.uplink: Uplink | None = None
        self._offer: tuple[str, int] | None = None    # (router id, uplink port) offered
        self._retry_at: float | None = None           # set while its connection fails
        self._retry_s = UPLINK_RETRY_S

    @property
    def tag(self) -> str:
        """The suffix this router's request ids end with ("" before ``Registered``)."""
        return self.router_id[:TAG_LEN]

    def send(self, frame: bytes) -> bool:
        """Send ``frame`` on the uplink when one is open, else queue it on the control
        socket (never blocks); False when the way to the router is full."""
        if self.uplink is not None and self.uplink.ready and not self.uplink.broken:
            try:
                return self.uplink.send(frame)
            except UplinkClosed as exc:
                log.warning("%s; sending on the control socket", exc)
        return self.send_control(frame)

    def send_control(self, frame: bytes) -> bool:
        """Queue ``frame`` on the control socket (never blocks); False when it is full."""
        try:
            self.sock.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def open_uplink(self, port: int, node_id: str) -> bool:
        """Begin the uplink the router offered on ``port`` (its host is the control
        address's) with a hello; messages take it once the router confirmed
        (:meth:`confirm_uplink`). False (staying on the control socket) for an ``ipc://``
        router, or while an earlier try at this router process's ``port`` waits to be
        retried (:meth:`tend_uplink`)."""
        offer = (self.router_id, port)
        if offer != self._offer:                  # a new offer starts with no retry due
            self._offer, self._retry_at, self._retry_s = offer, None, UPLINK_RETRY_S
        if self.uplink is not None or not 0 < port < 65536 \
                or not self.address.startswith("tcp://"):
            return False
        if self._retry_at is not None and time.monotonic() < self._retry_at:
            return False
        try:
            self.uplink = Uplink(urlsplit(self.address).hostname, port, node_id, os.getpid())
        except OSError as exc:
            self._connect_failed(str(exc))
            return False
        self.poller.register(self.uplink.fd, zmq.POLLIN)
        return True

    def _connect_failed(self, why: str) -> None:
        first = self._retry_at is None
        self._retry_at = time.monotonic() + self._retry_s
        (log.warning if first else log.info)(
            "router %s: no uplink at port %d (%s); sending on the control socket, trying "
            "again in %g s", self.address, self._offer[1], why, self._retry_s)
        self._retry_s = min(self._retry_s * 2, UPLINK_RETRY_MAX_S)

    def confirm_uplink(self, node_id: str, pid: int) -> None:
        """The router got this process's hello (``UplinkReady``): say ``UplinkSwitch`` as
        the control socket's last message and send on the uplink from now on."""
        if self.uplink is None or self.uplink.ready or self.uplink.broken \
                or pid != os.getpid():
            return
        self.send_control(m.encode(m.UplinkSwitch(node_id, pid)))
        self.uplink.ready = True
        self._retry_at, self._retry_s = None, UPLINK_RETRY_S
        log.info("router %s: uplink open (port %d)", self.address, self.uplink.port)

    def check_uplink(self, ready: dict) -> list[bytes]:
        """``ready`` (a poll's result) names the uplink: the router's frames it brought
        (none before the router's ``DownlinkSwitch``); an uplink that ended (or whose
        connection failed) is closed, after the frames that came before its end."""
        if self.uplink is None or self.uplink.fd not in ready:
            return []
        try:
            frames = self.uplink.receive()
        except UplinkClosed as exc:              # its connection could not be made
            self._uplink_broke(exc)
            return []
        if self.uplink.ended is not None:
            self._uplink_broke(UplinkClosed(self.uplink.ended))
        return frames

    def downlink_switch(self, msg: m.DownlinkSwitch) -> list[bytes]:
        """The router's last control-socket message before it writes on the uplink: the
        frames the uplink brought meanwhile, to handle next (none when the switch is
        for an uplink already closed: the router will count that one's end)."""
        held = self.uplink.switch_down(msg.port) if self.uplink is not None else None
        if held is None:
            log.info("router %s: a DownlinkSwitch for an uplink no longer open (port %d)",
                     self.address, msg.port)
            return []
        log.info("router %s: its messages now come on the uplink", self.address)
        return held

    def tend_uplink(self, node_id: str) -> None:
        """Each loop turn: push on what waits on the uplink (its hello first, once
        connected) and close it if it broke (later messages take the control socket;
        the router, which counts its end as the node's, asks the node to register
        again); with none open, try the offered one again once a failed connection's
        wait is over."""
        uplink = self.uplink
        if uplink is None:
            if self._retry_at is not None and self.registered \
                    and time.monotonic() >= self._retry_at:
                self.open_uplink(self._offer[1], node_id)
            return
        if uplink.pending and not uplink.broken:
            try:
                uplink.flush()
            except UplinkClosed as exc:
                self._uplink_broke(exc)
                return
        if uplink.broken:                      # by a send, which said so
            self.close_uplink()

    def _uplink_broke(self, exc: UplinkClosed) -> None:
        """Close the uplink ``exc`` ended; one whose connection was never made is tried
        again later."""
        failed = self.uplink.connect_failed
        self.close_uplink()
        if failed:
            self._connect_failed(str(exc))
        else:
            log.warning("%s; sending on the control socket", exc)

    def close_uplink(self, linger_ms: int = 0) -> None:
        """Close the uplink (waiting up to ``linger_ms`` for what it holds to leave);
        later messages take the control socket."""
        if self.uplink is not None:
            self.poller.unregister(self.uplink.fd)
            self.uplink.close(linger_ms)
            self.uplink = None

    def close(self, linger_ms: int = 0) -> None:
        """Close the uplink and the socket, waiting up to ``linger_ms`` for queued
        messages to leave."""
        self.close_uplink(linger_ms)
        self.poller.unregister(self.sock)
        self.sock.close(linger_ms)


class RouterLinks:
    """The node's links, kept equal to what ``--router`` resolves to.

    The engine loop owns the links (ZeroMQ sockets belong to one thread): it calls
    :meth:`sync` each turn, which applies the latest lookup cheaply, and waits on
    ``poller``, which holds every link's sockets. Other threads read :meth:`addresses`
    (the heartbeat thread opens its own socket per address).
    """

    def __init__(self, ctx: zmq.Context, node_id: str, spec: str,
                 resolve_s: float = 10.0) -> None:
        if not resolve_s > 0:
            raise ValueError(f"resolve_s must be > 0, got {resolve_s!r}")
        self.ctx, self.node_id, self.resolve_s = ctx, node_id, resolve_s
        self.entries = parse_routers(spec)
        self.links: dict[str, RouterLink] = {}
        self.poller = zmq.Poller()
        self._lock = threading.Lock()
        self._wanted: set[str] = set()           # the latest lookup's addresses
        self._seen: dict[str, float] = {}        # address → when a lookup last named it
        self._version = 0                        # bumped when _wanted changes
        self._applied = -1
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._lookup(time.monotonic())           # the first lookup before the first Register
        if any(e.is_name for e in self.entries):
            self._thread = threading.Thread(target=self._resolver, daemon=True,
                                            name="router-resolver")
            self._thread.start()

    # ----------------------------------------------------------------- lookups
    def _lookup(self, now: float) -> None:
        found: set[str] = set()
        for entry in self.entries:
            try:
                found.update(resolve(entry))
            except OSError as exc:               # keep what the last good lookup said
                log.warning("could not resolve router %s (%s); keeping its %d known "
                            "address(es)", entry.address, exc,
                            sum(1 for a in self._seen if entry.is_name))
                found.update(a for a in self._seen if entry.is_name)
        with self._lock:
            for address in found:
                self._seen[address] = now
            keep = {a for a, t in self._seen.items() if now - t < FORGET_AFTER_S}
            self._seen = {a: self._seen[a] for a in keep}
            if keep != self._wanted:
                self._wanted = keep
                self._version += 1

    def _resolver(self) -> None:
        while not self._halt.wait(self.resolve_s):
            self._lookup(time.monotonic())

    def addresses(self) -> list[str]:
        """The addresses the node should be registered with now (any thread)."""
        with self._lock:
            return sorted(self._wanted)

    # ----------------------------------------------------------------- the loop's side
    def sync(self) -> tuple[list[RouterLink], list[RouterLink]]:
        """Open links for new addresses and take out links for forgotten ones; returns
        ``(opened, removed)`` (the caller registers the first and cleans up after —
        and closes — the second, which takes its sockets out of the poller)."""
        with self._lock:
            if self._version == self._applied:
                return [], []
            self._applied, wanted = self._version, set(self._wanted)
        opened = [RouterLink(self.ctx, self.node_id, a, self.poller)
                  for a in sorted(wanted - set(self.links))]
        removed = [self.links.pop(a) for a in sorted(set(self.links) - wanted)]
        for link in opened:
            self.links[link.address] = link
            log.info("router %s: connecting", link.address)
        for link in removed:
            log.warning("router %s is gone from %s's answers; forgetting it", link.address,
                        ", ".join(e.address for e in self.entries if e.is_name))
        return opened, removed

    def owner(self, rid: str) -> RouterLink | None:
        """The link of the router that sent request ``rid`` (None: no such router)."""
        if len(self.links) == 1:
            return next(iter(self.links.values()))
        tag = rid.rpartition("-")[2]
        for link in self.links.values():
            if link.tag and link.tag == tag:
                return link
        return None

    def owned_by(self, link: RouterLink, router_id: str):
        """A predicate on request ids: sent by ``link``'s router while its id was
        ``router_id`` (every id when it is the only link)."""
        if list(self.links.values()) == [link]:
            return None
        tag = router_id[:TAG_LEN]
        return lambda rid: bool(tag) and rid.rpartition("-")[2] == tag

    def any_registered(self) -> bool:
        """Whether at least one router answered this node's Register (any thread: the
        readiness probe asks from the HTTP server's)."""
        return any(link.registered for link in list(self.links.values()))

    def close(self, linger_ms: int = 0) -> None:
        """Stop looking up and close every link (idempotent)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(5)
        for link in self.links.values():
            link.close(linger_ms)
        self.links.clear()
