"""The least a process-to-process hop costs on this machine, measured in the same run.

A fresh process sends ``time.monotonic()`` stamps, one at a time and
``HOP_INTERVAL_S`` apart (so the receiver is asleep when each comes), over
loopback TCP to the calling event loop; each stamp's age when ``data_received``
runs is one hop: the send, the kernel's loopback path and waking the receiver.
``disagg bench router`` reports it beside its latencies, which cross several
such hops (client → router → node → router → client).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import struct
import time

from disagg.bench.router_figures import percentiles

_STAMP = struct.Struct("!d")
HOP_INTERVAL_S = 0.005     # between a hop's probes: the receiver is asleep when each comes


def _hop_sender(port: int, probes: int) -> None:
    """The sending process of :func:`loopback_hop`: ``probes`` timestamps, one at a time."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(probes):
            time.sleep(HOP_INTERVAL_S)
            sock.sendall(_STAMP.pack(time.monotonic()))


class _HopReceiver(asyncio.Protocol):
    """The receiving end of :func:`loopback_hop`: each timestamp's age on arrival."""

    def __init__(self, hops: list[float], done: asyncio.Future) -> None:
        self.hops, self.done, self.buf = hops, done, b""

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        while len(self.buf) >= _STAMP.size:
            self.hops.append(now - _STAMP.unpack_from(self.buf)[0])
            self.buf = self.buf[_STAMP.size:]

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def loopback_hop(probes: int) -> dict:
    """One-way latency, in microseconds, of a timestamp sent by another process over
    loopback TCP to this event loop (send → ``data_received``): the least a
    process-to-process hop costs on this machine. The sender is a fresh process."""
    loop = asyncio.get_running_loop()
    hops: list[float] = []
    done = loop.create_future()
    server = await loop.create_server(lambda: _HopReceiver(hops, done), "127.0.0.1", 0)
    sender = multiprocessing.get_context("spawn").Process(
        target=_hop_sender, args=(server.sockets[0].getsockname()[1], probes), daemon=True)
    try:
        sender.start()
        await asyncio.wait_for(done, timeout=60 + probes * HOP_INTERVAL_S * 4)
    finally:
        server.close()
        sender.join(5)
    if sender.exitcode != 0 or len(hops) != probes:
        raise RuntimeError(f"the loopback hop sender exited {sender.exitcode} after "
                           f"{len(hops)} of {probes} probes")
    return {"probes": probes, **percentiles(hops, 50, 99, unit=1e6, digits=1)}
