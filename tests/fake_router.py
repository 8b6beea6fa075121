"""A stand-in router for tests that talk to real node processes over their control socket.

:class:`FakeRouter` binds the ROUTER socket nodes connect to (``--router``), answers
``Register`` with ``Registered``, keeps each node's latest heartbeat load, and does
what the real router does with messages about requests it does not know: it answers
them with ``Abort``, so nodes free what hostile messages made them take. Messages
about the requests a test drives itself (:attr:`FakeRouter.mine`) are kept for it.
Also here: starting a small node process against it (:func:`start_node`) and reading
what came back (:func:`finished`, :func:`tokens_of`, :func:`idle`).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import zmq

from disagg.control import messages as m

ROUTER_ID = "fuzz-router"


class FakeRouter:
    """The control socket of a router, driven by the test (see the module docstring)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # a full node queue blocks, not drops
        self.sock.setsockopt(zmq.SNDTIMEO, 20_000)        # ... for 20 s at most (node stuck)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address: str = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.registered: dict[str, m.Register] = {}
        self.loads: dict[str, dict] = {}                  # node id → its last heartbeat load
        self.beats: collections.Counter = collections.Counter()
        self.received: collections.Counter = collections.Counter()   # message types in
        self.mine: dict[str, list] = {}                   # rid → messages about it, in order
        #: called on every wait loop turn (e.g. a KV receiver the nodes send to)
        self.pumps: list[Callable[[], object]] = []

    def send(self, node_id: str, *frames: bytes) -> None:
        """Send one message (its frames) to ``node_id``."""
        self.sock.send_multipart([node_id.encode(), *frames])

    def send_msg(self, node_id: str, msg: m.ControlMessage) -> None:
        """Send a control message to ``node_id``."""
        self.send(node_id, m.encode(msg))

    def serve(self, timeout_s: float = 0.0) -> int:
        """Handle what the nodes sent (waiting up to ``timeout_s`` for the first); return
        how many messages."""
        n = 0
        if not self.sock.poll(int(timeout_s * 1000)):
            return 0
        while True:
            try:
                ident, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1
            msg = m.decode(frames[0])          # nodes send well-formed single frames
            self.received[type(msg).__name__] += 1
            self._on(ident.decode(), msg, frames[0])

    def _on(self, ident: str, msg: m.ControlMessage, frame: bytes) -> None:
        if isinstance(msg, m.Register):
            self.registered[msg.node_id] = msg
            self.send_msg(ident, m.Registered(msg.node_id, ROUTER_ID))
        elif isinstance(msg, m.Heartbeat):
            self.loads[msg.node_id] = dict(msg.load)
            self.beats[msg.node_id] += 1
        elif isinstance(msg, m.StepTokens):
            for item in msg.items:
                self._about(ident, item.rid, item, abort=not item.finished)
        elif isinstance(msg, (m.KVTarget, m.FirstToken)):
            self._about(ident, msg.rid, msg, abort=True)
        elif isinstance(msg, (m.KVSent, m.Rejected, m.Tokens)):
            self._about(ident, msg.rid, msg, abort=False)

    def _about(self, ident: str, rid: str, msg, abort: bool) -> None:
        if rid in self.mine:
            self.mine[rid].append(msg)
        elif abort:
            self.send_msg(ident, m.Abort(rid))

    def wait(self, done: Callable[[], bool], timeout_s: float,
             what: str | Callable[[], str]) -> None:
        """Serve until ``done()``; ``AssertionError`` naming ``what`` (or what it returns
        then) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, \
                f"timed out waiting for {what() if callable(what) else what}"
            self.serve(0.02)
            for pump in self.pumps:
                pump()

    def fresh_loads(self, node_ids, timeout_s: float = 10.0) -> dict[str, dict]:
        """Every node's load from a heartbeat sent after this call."""
        seen = {n: self.beats[n] for n in node_ids}
        self.wait(lambda: all(self.beats[n] > seen[n] for n in node_ids), timeout_s,
                  f"heartbeats from {list(node_ids)}")
        return {n: self.loads[n] for n in node_ids}

    def request(self, node_id: str, msg, until: Callable[[list], bool], what: str,
                timeout_s: float = 60.0) -> list:
        """Send ``msg`` (about request ``msg.rid``, one the test drives) to ``node_id``;
        serve until ``until(every message about that request so far)``; return those."""
        got = self.mine.setdefault(msg.rid, [])
        self.send_msg(node_id, msg)
        self.wait(lambda: until(got), timeout_s, what)
        return got

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


def finished(msgs: list) -> bool:
    """Whether a request's messages include its end."""
    return any(isinstance(x, m.Tokens) and x.finished for x in msgs)


def tokens_of(msgs: list) -> list[int]:
    """The tokens a request's ``Tokens`` messages carried, in order."""
    return [t for x in msgs if isinstance(x, m.Tokens) for t in x.new_token_ids]


#: a node's heartbeat load keys that are all 0 when it holds nothing
IDLE_KEYS = ("num_running", "num_waiting", "num_waiting_for_kv", "num_pinned", "num_requests",
             "num_used_blocks", "num_kv_sends", "kv_usage")


def idle(load: dict) -> bool:
    """Nothing held: no request in any state, no KV block in use, no pin, no send."""
    return all(load.get(k, 0) == 0 for k in IDLE_KEYS)


def start_node(role: str, node_id: str, router: str, model: str, log_dir) -> subprocess.Popen:
    """A real node process of ``role`` serving ``model`` (small: 64 KV blocks of 16 tokens,
    128-token context), registering with ``router``; its output in ``log_dir/ROLE.log``."""
    log = open(Path(log_dir) / f"{role}.log", "wb")
    cmd = [sys.executable, "-m", f"{role}_node", "--router", router, "--node-id", node_id,
           "--model", model, "--kv-transport", "zmq", "--kv-address", "tcp://127.0.0.1:*",
           "--num-kv-blocks", "64", "--max-model-len", "128", "--max-num-seqs", "16",
           "--heartbeat-s", "0.2", "--torch-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    return proc
