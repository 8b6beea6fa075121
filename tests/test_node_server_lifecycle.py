"""The node process loop's life beyond serving: graceful drain (its first SIGTERM),
leaving, a second signal, a router restart (a new ``router_id``), and the engine's
counters of what it holds that make leaks visible from outside.

A real tiny engine behind a real :class:`NodeServer`, against a ZeroMQ ROUTER socket
the test scripts message by message (:class:`ScriptedRouter`).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import zmq

from conftest import random_prompts
from decode_node.handler import DecodeHandler
from disagg.config import EngineConfig
from disagg.control import messages as m
from disagg.engine import LLMEngine
from disagg.engine.request import KVMode
from disagg.node.server import NodeServer
from disagg.sampling_params import SamplingParams

LONG = {"max_tokens": 40, "ignore_eos": True, "temperature": 0.0}
HELD = ("num_requests", "num_used_blocks", "num_pinned", "num_kv_sends")


# ---------------------------------------------------------------- engine counters

def test_load_counts_what_the_engine_holds_and_abort_all_frees_it(tiny_llama):
    cfg = dict(model=tiny_llama, block_size=4, num_kv_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLMEngine(EngineConfig(role="decode", **cfg)) as d:
        d.generate([random_prompts(1, 256, 20, 21, seed=1)[0]], params)
        idle = d.load()
        assert d.scheduler.blocks.pool.num_cached_blocks > 0     # its blocks stay cached...
        assert {k: idle[k] for k in HELD} == dict.fromkeys(HELD, 0)  # ...but are not held
        assert d.is_idle()
        running, waiting, remote = random_prompts(3, 256, 12, 13, seed=2)
        d.add_request(running, params)
        d.step()
        d.add_request(remote, params, kv_mode=KVMode.LOAD_REMOTE)    # waits for its KV
        d.reserve_kv_loads()
        d.add_request(waiting, params)
        load = d.load()
        assert load["num_requests"] == 3 and load["num_waiting_for_kv"] == 1
        assert load["num_used_blocks"] == 3 + 3     # 12-token prompts, 4-token blocks; the
                                                    # waiting one has none yet
        assert not d.is_idle()
        assert len(d.abort_all()) == 3
        assert {k: d.load()[k] for k in HELD} == dict.fromkeys(HELD, 0) and d.is_idle()
        d.scheduler.blocks.pool.check_invariants()
    with LLMEngine(EngineConfig(role="prefill", **cfg)) as p:
        p.add_request(random_prompts(1, 256, 16, 17, seed=3)[0], params)
        while p.has_unfinished():
            p.step()
        load = p.load()               # prefilled: its blocks stay pinned for the decode side
        assert (load["num_requests"], load["num_pinned"], load["num_kv_sends"]) == (1, 1, 0)
        assert load["num_used_blocks"] == 4 and not p.is_idle()
        assert len(p.abort_all()) == 1
        assert {k: p.load()[k] for k in HELD} == dict.fromkeys(HELD, 0)


# ---------------------------------------------------------------- the node server

class ScriptedRouter:
    """A ZeroMQ ROUTER socket the node connects to; collects what it sends."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.got: list = []

    def send(self, msg) -> None:
        self.sock.send_multipart([b"decode-0", m.encode(msg)])

    def recv(self, kind, timeout_s: float = 60.0, where=lambda msg: True):
        """The next ``kind`` message matching ``where`` (others are kept in ``got``)."""
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            _, frame = self.sock.recv_multipart()
            msg = m.decode(frame)
            self.got.append(msg)
            if isinstance(msg, kind) and where(msg):
                return msg
        raise AssertionError(f"no {kind.__name__} within {timeout_s} s; got "
                             f"{[type(x).__name__ for x in self.got[-20:]]}")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@contextmanager
def running_node(model: str, drain_timeout_s: float = 30.0):
    """A decode ``NodeServer`` on a tiny engine (``model``), running in a thread against a
    ScriptedRouter that has answered its ``Register`` (as router ``router-a``); yields
    ``(router, server, stop, drain, thread)`` and stops and closes them all on exit."""
    router = ScriptedRouter()
    engine = LLMEngine(EngineConfig(model=model, role="decode", block_size=4,
                                    num_kv_blocks=64))
    server = NodeServer(engine, DecodeHandler, router.address, "decode-0", "m",
                        heartbeat_s=0.1, drain_timeout_s=drain_timeout_s)
    stop, drain = threading.Event(), threading.Event()
    thread = threading.Thread(target=server.run, args=(stop, drain), daemon=True)
    thread.start()
    try:
        router.recv(m.Register)
        router.send(m.Registered("decode-0", "router-a"))
        yield router, server, stop, drain, thread
    finally:
        stop.set()
        thread.join(30)
        server.close()
        router.close()


@pytest.fixture
def node(tiny_llama):
    """:func:`running_node` with a 30 s drain grace period."""
    with running_node(tiny_llama) as parts:
        yield parts


def _finished(rid):
    return lambda msg: any(t.rid == rid and t.finished for t in msg.items)


def test_drain_finishes_held_requests_refuses_new_ones_then_deregisters(node):
    router, server, stop, drain, thread = node
    prompts = random_prompts(2, 256, 10, 11, seed=4)
    router.send(m.Generate("r0", prompts[0], LONG, False))
    router.recv(m.StepTokens, where=lambda msg: any(t.rid == "r0" for t in msg.items))
    t0 = time.monotonic()
    drain.set()
    router.recv(m.Drain)
    router.send(m.Generate("r1", prompts[1], LONG, False))       # crossed the Drain
    assert router.recv(m.Rejected) == m.Rejected("r1", m.DRAINING)
    router.recv(m.StepTokens, where=_finished("r0"))           # r0 still runs to its end
    router.recv(m.Deregister)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 30
    finished = [t for msg in router.got if isinstance(msg, m.StepTokens) for t in msg.items
                if t.rid == "r0" and t.finished]
    assert finished[0].output_len == LONG["max_tokens"]
    assert not any(t.rid == "r1" for msg in router.got if isinstance(msg, m.StepTokens)
                   for t in msg.items)
    assert server.engine.is_idle()


def test_drain_gives_up_after_its_grace_period(tiny_llama):
    with running_node(tiny_llama, drain_timeout_s=0.5) as (router, server, stop, drain, thread):
        # remote KV that never comes: the request would wait for kv_load_timeout_s (30 s)
        router.send(m.Generate("r0", random_prompts(1, 256, 10, 11, seed=5)[0], LONG, True))
        router.recv(m.KVTarget)
        t0 = time.monotonic()
        drain.set()
        router.recv(m.Drain)
        router.recv(m.Deregister)
        waited = time.monotonic() - t0
        thread.join(10)
        assert not thread.is_alive() and 0.4 < waited < 10, waited
        assert server.engine.load()["num_requests"] == 1   # left to the router (Deregister)


def test_a_second_signal_stops_a_draining_node_at_once(node):
    router, server, stop, drain, thread = node
    router.send(m.Generate("r0", random_prompts(1, 256, 10, 11, seed=7)[0], LONG, True))
    router.recv(m.KVTarget)                                     # held: waits for its KV
    drain.set()
    router.recv(m.Drain)
    t0 = time.monotonic()
    stop.set()                                                  # the second SIGTERM
    router.recv(m.Deregister)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    assert server.engine.load()["num_requests"] == 1            # left to the router


def test_a_new_router_id_aborts_every_held_request(node):
    router, server, stop, drain, thread = node
    prompts = random_prompts(2, 256, 10, 11, seed=6)
    router.send(m.Generate("local", prompts[0], {**LONG, "max_tokens": 10_000}, False))
    router.send(m.Generate("remote", prompts[1], LONG, True))    # waits for KV
    router.recv(m.KVTarget)
    held = router.recv(m.Heartbeat, where=lambda b: b.load["num_requests"] == 2)
    assert held.load["num_used_blocks"] > 0
    router.send(m.Registered("decode-0", "router-a"))           # the same router: nothing
    router.recv(m.StepTokens, where=lambda msg: any(t.rid == "local" for t in msg.items))
    assert server.engine.load()["num_requests"] == 2
    router.send(m.Registered("decode-0", "router-b"))           # a new router process
    beat = router.recv(m.Heartbeat, where=lambda b: b.load["num_requests"] == 0)
    assert {k: beat.load[k] for k in HELD} == dict.fromkeys(HELD, 0)
    (link,) = server.links.links.values()
    assert link.router_id == "router-b" and server.handler._remote == {}
    router.send(m.Generate("new", prompts[0], {**LONG, "max_tokens": 3}, False))
    router.recv(m.StepTokens, where=_finished("new"))           # and it serves the new one


def test_being_dropped_by_the_router_aborts_every_held_request(node):
    """RegisterAgain while registered: the router dropped this node (it was silent, e.g.
    SIGSTOPped, past the node timeout) and moved its requests elsewhere; the copies left
    here would otherwise run on (or wait for KV) with nobody reading them."""
    router, server, stop, drain, thread = node
    prompts = random_prompts(2, 256, 10, 11, seed=7)
    router.send(m.Generate("local", prompts[0], {**LONG, "max_tokens": 10_000}, False))
    router.send(m.Generate("remote", prompts[1], LONG, True))    # waits for KV
    router.recv(m.KVTarget)
    router.recv(m.Heartbeat, where=lambda b: b.load["num_requests"] == 2)
    router.send(m.RegisterAgain("decode-0"))
    router.recv(m.Register)                                       # it registers again
    beat = router.recv(m.Heartbeat, where=lambda b: b.load["num_requests"] == 0)
    assert {k: beat.load[k] for k in HELD} == dict.fromkeys(HELD, 0)
    router.send(m.Registered("decode-0", "router-a"))
    router.send(m.RegisterAgain("decode-0"))     # a late duplicate before it is registered...
    router.send(m.Generate("new", prompts[0], {**LONG, "max_tokens": 3}, False))
    router.recv(m.StepTokens, where=_finished("new"))           # ...does not abort new work
