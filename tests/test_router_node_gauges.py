"""The router's per-node gauges of what each node registered with (``disagg_node_tp``,
``..._compute_units``, ``..._kv_capacity_tokens``, ``..._kv_bytes_per_token``): set by
``Register``, gone when the node leaves, is dropped, is refused or comes back in another
role; and ``disagg_cost_model_observations``, the measurements behind each calibrated
estimate, counted as the control messages feed the calibration.

A real :class:`Dispatcher` whose outgoing messages are recorded instead of sent.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from disagg.control import messages as m
from disagg.sampling_params import SamplingParams
from router.inflight import Inflight
from router_helpers import recording_dispatcher
from router_helpers import register_message as reg

SHAPE = ("disagg_node_tp", "disagg_node_compute_units", "disagg_node_kv_capacity_tokens",
         "disagg_node_kv_bytes_per_token")
OBS = "disagg_cost_model_observations"


@pytest.fixture
def dispatcher():
    d = recording_dispatcher("cost")
    try:
        yield d
    finally:
        asyncio.run(d.close())


def _shape(d, node: str, role: str) -> tuple:
    """The four registration gauges of ``node`` (None where a series is absent)."""
    return tuple(d.prom.get_sample_value(name, {"node": node, "role": role}) for name in SHAPE)


def _series(d, name: str) -> set[tuple]:
    """``{(node, role)}`` of every series of family ``name``."""
    return {(s.labels["node"], s.labels["role"]) for f in d.prom.collect() for s in f.samples
            if s.name == name}


def _obs(d, name: str, role: str = "", node: str = "") -> float | None:
    return d.prom.get_sample_value(OBS, {"name": name, "role": role, "node": node})


def test_register_sets_what_the_node_reported(dispatcher):
    d = dispatcher
    # a CPU prefill node: TP 2 over 4 cores, 100 blocks of 16 tokens, 64 bytes a token
    cpu = msgspec.structs.replace(reg("p0", "prefill"), tp=2, cpus=[0, 1, 2, 3], device="cpu")
    # a GPU decode node: GPUs count, not the cores it may run on
    gpu = msgspec.structs.replace(reg("d0"), tp=2, num_kv_blocks=500,
                                  kv_bytes_per_token=4096, cpus=list(range(8)),
                                  device="cuda", gpus=["GPU-a", "GPU-b"])
    old = reg("d1")                                  # an older node: no compute report
    for msg in (cpu, gpu, old):
        d.handlers.handle(msg.node_id, msg, b"")
    assert _shape(d, "p0", "prefill") == (2, 4, 1600, 64)
    assert _shape(d, "d0", "decode") == (2, 2, 8000, 4096)
    assert _shape(d, "d1", "decode") == (1, 0, 1600, 64)
    assert _series(d, "disagg_node_tp") == {("p0", "prefill"), ("d0", "decode"),
                                            ("d1", "decode")}


def test_leaving_being_dropped_or_refused_removes_the_series(dispatcher):
    d = dispatcher
    for node_id, role in (("d0", "decode"), ("d1", "decode"), ("d2", "decode"),
                          ("p0", "prefill"), ("p1", "prefill")):
        d.handlers.handle(node_id, reg(node_id, role), b"")
    d.handlers.handle("d0", m.Deregister("d0"), b"")                   # left
    d.handlers.handle("p0", m.Drain("p0"), b"")                        # draining: still there
    node = d.registry.remove("d1")                                     # dropped as silent,
    d.node_lost(node, "node_timeout")                                  # as the health loop does
    d.handlers.handle("d2", m.Register("d2", "decode", 1, 16, "other-model", 4096, 1000, 100,
                                       64, "zmq", ["tcp://127.0.0.1:1"], 2, "h"), b"")
    assert d.sent[-1][1] == m.Refused("d2", "node serves model 'other-model', this router "
                                            "serves 'm'")   # restarted, refused: no series
    assert _shape(d, "d2", "decode") == (None,) * 4
    d.handlers.handle("p1", reg("p1", "decode"), b"")                 # same process, as decode
    for name in SHAPE:
        assert _series(d, name) == {("p0", "prefill"), ("p1", "decode")}, name
    assert _shape(d, "p0", "prefill") == (1, 0, 1600, 64)
    d.handlers.handle("hb:p1", m.Heartbeat("p1", {"num_requests": 0}, [], 0, 0), b"")
    d.handlers.handle("p1", m.Deregister("p1"), b"")
    d.handlers.handle("p0", m.Deregister("p0"), b"")
    for name in (*SHAPE, "disagg_node_requests", "disagg_queue_depth"):
        assert _series(d, name) == set(), name


def _remote(d, rid: str) -> Inflight:
    req = Inflight(rid, [1, 2, 3], SamplingParams(max_tokens=4), [], time.monotonic(), "d0",
                   "p0", "remote", transfer_bytes=1 << 20)
    d.inflight[rid] = req
    return req


def test_observations_count_every_measurement_behind_each_estimate(dispatcher):
    d = dispatcher
    cal = d.policy.calibration
    # before any measurement: the shared fits' series, at 0
    assert _obs(d, "prefill_tokens_per_s", "prefill", "*") == 0
    assert _obs(d, "decode_step_per_seq_s", node="*") == 0
    assert _obs(d, "link_bytes_per_s") == 0 and _obs(d, "remote_overhead_s") == 0
    for node_id, role in (("d0", "decode"), ("p0", "prefill")):
        d.handlers.handle(node_id, reg(node_id, role), b"")
    # steps: [prefill tokens, decodes, seconds]; a step with prompt tokens is a prefill
    d.handlers.handle("hb:p0", m.Heartbeat("p0", {}, [[100, 0, 0.2], [300, 0, 0.5]], 0, 0), b"")
    d.handlers.handle("hb:d0", m.Heartbeat("d0", {}, [[50, 2, 0.2], [0, 3, 0.05],
                                                      [0, 4, 0.06], [0, 4, 0.06]], 0, 0), b"")
    for rid in ("a", "b", "c"):
        _remote(d, rid)
        d.handlers.handle("p0", m.KVSent(rid, None, 0.01), b"")
    d.handlers.handle("p0", m.FirstToken("a", 7, None, 0.1, time.monotonic()), b"")
    want = {("prefill_tokens_per_s", "prefill", "*"): 2, ("prefill_overhead_s", "prefill", "p0"): 2,
            ("prefill_tokens_per_s", "decode", "d0"): 1, ("prefill_overhead_s", "decode", "*"): 1,
            ("decode_step_base_s", "", "d0"): 3, ("decode_step_per_seq_s", "", "*"): 3,
            ("link_bytes_per_s", "", ""): 3, ("link_latency_s", "", ""): 3,
            ("remote_overhead_s", "", ""): 1}
    for (name, role, node), count in want.items():
        assert _obs(d, name, role, node) == count, (name, role, node)
    # one observation series per estimate row, each with its fit's count
    rows = {(n, lab.get("role", ""), lab.get("node", "")) for n, lab, _ in cal.snapshot()}
    got = {(s.labels["name"], s.labels["role"], s.labels["node"]): s.value
           for f in d.prom.collect() for s in f.samples if s.name == OBS}
    assert set(got) == rows
    assert got == {(n, lab.get("role", ""), lab.get("node", "")): c
                   for n, lab, c in cal.observation_counts()}
    # a node leaving keeps its fits (and their counts), as the estimates keep theirs
    d.handlers.handle("p0", m.Deregister("p0"), b"")
    assert _obs(d, "prefill_tokens_per_s", "prefill", "p0") == 2
