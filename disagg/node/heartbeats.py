"""A node's heartbeats: from a thread of their own, so a node stays "alive" to its
routers through a long step (a CPU prefill chunk can take seconds).

Every ``period_s`` the thread sends each router the loop's latest load, the step
timings recorded since the last beat (the newest ``MAX_STEP_SAMPLES``) and the KV
byte counters, on its own DEALER per router address (identity ``hb:`` + node id,
so the router never mistakes it for the node's control connection).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from disagg.control import messages as m

MAX_STEP_SAMPLES = 64       # step timings carried by one heartbeat (the newest)


class Heartbeats:
    """What the next heartbeat says (set by the node's loop) and the thread that sends it
    to every address ``addresses()`` returns."""

    def __init__(self, ctx: zmq.Context, node_id: str, period_s: float,
                 addresses: Callable[[], list[str]], load: dict) -> None:
        self.ctx, self.node_id, self.period_s, self.addresses = ctx, node_id, period_s, addresses
        self._lock = threading.Lock()
        self._steps: list[list] = []
        self._snapshot = (load, 0, 0)
        self._thread: threading.Thread | None = None

    def update(self, load: dict, bytes_sent: int, bytes_received: int) -> None:
        """The engine's latest load and KV byte counters (the loop's thread)."""
        self._snapshot = (load, bytes_sent, bytes_received)

    def record_step(self, prefill_tokens: int, decodes: int, seconds: float) -> None:
        """One engine step's size and duration (the loop's thread)."""
        with self._lock:
            self._steps.append([prefill_tokens, decodes, seconds])
            del self._steps[:-MAX_STEP_SAMPLES]

    def start(self, stop: threading.Event) -> None:
        """Beat until ``stop`` is set (:meth:`join` waits for the thread's end)."""
        self._thread = threading.Thread(target=self._run, args=(stop,), daemon=True,
                                        name="heartbeat")
        self._thread.start()

    def join(self) -> None:
        """Wait for the thread started by :meth:`start` to end."""
        if self._thread is not None:
            self._thread.join()

    def _run(self, stop: threading.Event) -> None:
        socks: dict[str, zmq.Socket] = {}
        try:
            while not stop.wait(self.period_s):
                wanted = set(self.addresses())
                for address in set(socks) - wanted:
                    socks.pop(address).close(0)
                for address in sorted(wanted - set(socks)):
                    sock = socks[address] = self.ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.IDENTITY, f"hb:{self.node_id}".encode())
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(address)
                with self._lock:
                    steps, self._steps = self._steps, []
                load, sent, received = self._snapshot
                frame = m.encode(m.Heartbeat(self.node_id, load, steps, sent, received))
                for sock in socks.values():
                    try:
                        sock.send(frame, zmq.NOBLOCK)
                    except zmq.Again:
                        pass                 # that router is away; the next beat will do
        finally:
            for sock in socks.values():
                sock.close(0)
