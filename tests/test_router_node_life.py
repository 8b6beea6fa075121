"""The router's side of a node's life: ``Registered`` with the router's id, restarts
counted, the leak gauges from heartbeats, ``Drain`` (kept, never picked), a request
refused for draining routed again, ``Deregister`` (removed, its requests recovered).

A real :class:`Dispatcher` whose outgoing messages are recorded instead of sent.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from msgspec.structs import replace as msgspec_replace

from disagg.control import messages as m
from disagg.sampling_params import SamplingParams
from router.inflight import Inflight
from router_helpers import recording_dispatcher
from router_helpers import register_message as reg


@pytest.fixture
def dispatcher():
    """A Dispatcher whose sends are recorded (``d.sent``) instead of going out."""
    d = recording_dispatcher()
    try:
        yield d
    finally:
        asyncio.run(d.close())


def _gauge(d, name: str, **labels) -> float | None:
    return d.prom.get_sample_value(name, labels)


def test_registered_carries_the_router_id_and_restarts_are_counted(dispatcher):
    d = dispatcher
    d.handlers.handle("d0", reg("d0", pid=10), b"")
    d.handlers.handle("d0", reg("d0", pid=10), b"")              # repeated: re-acked
    assert d.sent == [("d0", m.Registered("d0", d.router_id, d.uplink_port))] * 2 \
        and d.uplink_port > 0 and len(d.router_id) == 32
    assert _gauge(d, "disagg_node_restarts_total", role="decode") == 0
    d.handlers.handle("d0", reg("d0", pid=11), b"")              # restarted
    assert _gauge(d, "disagg_node_restarts_total", role="decode") == 1
    d.registry.remove("d0")                                      # dropped as silent...
    d.handlers.handle("d0", reg("d0", pid=11), b"")              # ...back, same process
    assert _gauge(d, "disagg_node_restarts_total", role="decode") == 1
    d.registry.remove("d0")
    d.handlers.handle("d0", reg("d0", pid=12), b"")              # back as a new process
    assert _gauge(d, "disagg_node_restarts_total", role="decode") == 2
    other = recording_dispatcher()
    asyncio.run(other.close())
    assert other.router_id != d.router_id                         # one per router process


def test_heartbeat_sets_the_leak_gauges_and_leaving_removes_them(dispatcher):
    d = dispatcher
    d.handlers.handle("d0", reg("d0"), b"")
    load = {"num_requests": 3, "num_used_blocks": 12, "num_pinned": 0, "num_kv_sends": 0}
    d.handlers.handle("hb:d0", m.Heartbeat("d0", load, [], 0, 0), b"")
    assert _gauge(d, "disagg_node_requests", node="d0", role="decode") == 3
    assert _gauge(d, "disagg_node_kv_blocks_used", node="d0", role="decode") == 12
    assert _gauge(d, "disagg_node_pinned_requests", node="d0", role="decode") == 0
    assert _gauge(d, "disagg_node_kv_sends", node="d0", role="decode") == 0
    d.handlers.handle("d0", m.Deregister("d0"), b"")
    for name in ("disagg_node_requests", "disagg_node_kv_blocks_used", "disagg_queue_depth"):
        assert _gauge(d, name, node="d0", role="decode") is None, name


def _inflight(d, rid: str, decode: str, prefill: str | None = None) -> Inflight:
    req = Inflight(rid, [1, 2, 3], SamplingParams(max_tokens=4), [], time.monotonic(), decode,
                   prefill, "remote" if prefill else "local")
    d.inflight[rid] = req
    return req


def test_drain_keeps_the_node_but_routes_around_it_and_deregister_recovers(dispatcher):
    d = dispatcher
    for node_id in ("d0", "d1"):
        d.handlers.handle(node_id, reg(node_id), b"")
    held = _inflight(d, "held", "d0")
    d.sent.clear()
    d.handlers.handle("d0", m.Drain("d0"), b"")
    assert d.registry.nodes["d0"].state == "draining"
    assert _gauge(d, "disagg_nodes", role="decode", state="up") == 1
    assert _gauge(d, "disagg_nodes", role="decode", state="draining") == 1
    d.handlers.handle("hb:d0", m.Heartbeat("d0", {}, [], 0, 0), b"")
    assert d.sent == [] and "d0" in d.registry.nodes             # still alive, still known
    for _ in range(4):                                          # the other node gets them all
        assert d.submit([1, 2, 3], SamplingParams(max_tokens=4), time.monotonic()).decode == "d1"
    d.sent.clear()
    d.handlers.handle("d0", m.Deregister("d0"), b"")
    assert "d0" not in d.registry.nodes
    assert held.decode == "d1" and ("d1", m.Generate("held", [1, 2, 3], held.params.to_dict(),
                                                      False)) in d.sent
    for state, want in (("up", 1), ("draining", 0), ("down", 0)):    # left: not "down"
        assert _gauge(d, "disagg_nodes", role="decode", state=state) == want, state
    d.handlers.handle("d0", m.Deregister("d0"), b"")               # again: ignored, no reply
    assert ("d0", m.RegisterAgain("d0")) not in d.sent


def test_a_request_refused_for_draining_is_routed_again(dispatcher):
    d = dispatcher
    for node_id, role in (("d0", "decode"), ("d1", "decode"), ("p0", "prefill")):
        d.handlers.handle(node_id, reg(node_id, role), b"")
    crossed = _inflight(d, "crossed", "d0")
    d.sent.clear()
    d.handlers.handle("d0", m.Rejected("crossed", m.DRAINING), b"")
    assert d.registry.nodes["d0"].draining                      # taken as its Drain too
    assert crossed.decode == "d1" and "crossed" in d.inflight and crossed.events.empty()
    assert ("d1", m.Generate("crossed", [1, 2, 3], crossed.params.to_dict(), False)) in d.sent
    remote = _inflight(d, "remote", "d1", prefill="p0")
    d.handlers.handle("p0", m.Rejected("remote", m.DRAINING), b"")
    assert remote.fell_back and ("d1", m.Fallback("remote", "prefill_draining")) in d.sent
    assert d.registry.nodes["p0"].draining and d.registry.pick_prefill(10) is None
    other = _inflight(d, "other", "d1")                          # any other refusal: an error
    d.handlers.handle("d1", m.Rejected("other", "prompt too long"), b"")
    _, event = other.events.get_nowait()
    assert event.error is not None and event.error.status == 400


def test_a_bad_register_from_a_registered_process_keeps_it_one_from_a_new_process_replaces_it(
        dispatcher):
    d = dispatcher
    d.handlers.handle("d0", reg("d0", pid=10), b"")
    d.inflight["r1"] = Inflight("r1", [1, 2, 3], SamplingParams(max_tokens=4), [],
                                time.monotonic(), "d0", None, "local")
    bad = m.Register("d0", "decode", 1, 16, "m", 4096, 1000, 0, 64, "zmq",
                     ["tcp://127.0.0.1:1"], 10, "h")                 # 0 KV blocks
    d.handlers.handle("d0", bad, b"")                                # a broken frame, same pid
    assert isinstance(d.sent[-1][1], m.Refused) and "num_kv_blocks" in d.sent[-1][1].reason
    assert "d0" in d.registry.nodes and d.inflight["r1"].decode == "d0"   # untouched
    d.handlers.handle("d0", msgspec_replace(bad, pid=11), b"")       # a new process, bad
    assert "d0" not in d.registry.nodes                              # the old one is gone,
    assert d.inflight["r1"].parked_until is not None                 # its request recovered
    assert _gauge(d, "disagg_nodes", role="decode", state="up") == 0
