"""The router's node table (registration, health, load, picking) and its
prefix-cache guess (:class:`PrefixIndex`)."""

from __future__ import annotations

import time

import pytest

from disagg.control import messages as m
from disagg.kv_cache.hashing import hash_blocks
from router.nodes import RUNNING_TOKEN_WEIGHT, NodeRegistry
from router.prefix_index import PrefixIndex
from router.route_types import Compute

MODEL = "smollm2"
BLOCK = 16


def reg(node_id: str, role: str = "decode", **overrides) -> m.Register:
    """A valid ``Register`` for ``node_id``; ``overrides`` replace fields."""
    fields = dict(node_id=node_id, role=role, tp=1, block_size=BLOCK, model=MODEL,
                  max_model_len=8192, vocab_size=49152, num_kv_blocks=256,
                  kv_bytes_per_token=23040, kv_transport="zmq",
                  kv_endpoints=["tcp://127.0.0.1:40000"] if role == "decode" else [],
                  pid=1, host="localhost")
    fields.update(overrides)
    return m.Register(**fields)


def beat(node_id: str, **load) -> m.Heartbeat:
    """A heartbeat carrying ``load``."""
    return m.Heartbeat(node_id, load, [], 0, 0)


# ---------------------------------------------------------------- PrefixIndex

def test_prefix_match_counts_leading_blocks_only():
    idx = PrefixIndex()
    idx.add_node("a", 10)
    idx.insert("a", [1, 2, 3])
    assert idx.match("a", [1, 2, 3, 4]) == 3
    assert idx.match("a", [1, 2]) == 2
    assert idx.match("a", [9, 2, 3]) == 0            # later hits do not count past a miss
    assert idx.match("a", [1, 9, 3]) == 1
    assert idx.match("a", []) == 0


def test_prefix_unknown_node_and_remove():
    idx = PrefixIndex()
    assert idx.match("ghost", [1]) == 0
    idx.insert("ghost", [1])                         # ignored, not an error
    assert idx.match("ghost", [1]) == 0
    idx.add_node("a", 4)
    idx.insert("a", [1, 2])
    idx.remove_node("a")
    assert idx.match("a", [1, 2]) == 0
    idx.remove_node("a")                             # twice is fine
    idx.add_node("a", 4)                             # back, empty
    assert idx.match("a", [1, 2]) == 0


def test_prefix_lru_eviction_and_refresh():
    idx = PrefixIndex()
    idx.add_node("a", 3)
    idx.insert("a", [1, 2, 3])                       # leading blocks newest: 3 is the oldest
    idx.insert("a", [4])                             # over capacity: 3 goes
    assert idx.match("a", [3]) == 0
    assert idx.match("a", [1, 2]) == 2 and idx.match("a", [4]) == 1
    idx.insert("a", [2])                             # refreshes 2: now 1 is the oldest
    idx.insert("a", [5])
    assert idx.match("a", [1]) == 0
    assert idx.match("a", [2]) == 1 and idx.match("a", [4]) == 1 and idx.match("a", [5]) == 1
    idx.insert("a", [6, 7, 8, 9])                    # more than capacity: the prompt's tail goes
    assert [idx.match("a", [h]) for h in (6, 7, 8, 9)] == [1, 1, 1, 0]


def test_prefix_nodes_are_separate():
    idx = PrefixIndex()
    idx.add_node("a", 8)
    idx.add_node("b", 8)
    idx.insert("a", [1, 2])
    assert idx.match("a", [1, 2]) == 2 and idx.match("b", [1, 2]) == 0


@pytest.mark.parametrize("capacity", [0, -1])
def test_prefix_capacity_must_be_positive(capacity):
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixIndex().add_node("a", capacity)


# ---------------------------------------------------------------- registration

def test_register_checks():
    r = NodeRegistry(MODEL)
    with pytest.raises(ValueError, match="model 'other'"):
        r.register(reg("d0", model="other"))
    with pytest.raises(ValueError, match="unknown role 'both'"):
        r.register(reg("d0", role="both"))
    with pytest.raises(ValueError, match="KV receive endpoints"):
        r.register(reg("d0", kv_endpoints=[]))
    assert r.nodes == {} and r.block_size() is None
    r.register(reg("d0"))
    r.register(reg("p0", "prefill"))                 # a prefill node needs no endpoints
    with pytest.raises(ValueError, match="block size 32 differs from node d0's 16"):
        r.register(reg("d1", block_size=32))
    with pytest.raises(ValueError, match="KV transport 'shm' differs"):
        r.register(reg("p1", "prefill", kv_transport="shm"))
    assert set(r.nodes) == {"d0", "p0"} and r.block_size() == BLOCK
    with pytest.raises(ValueError, match="node_timeout_s"):
        NodeRegistry(MODEL, node_timeout_s=0)


def test_reregister_replaces_node_and_its_prefix_guess():
    r = NodeRegistry(MODEL)
    r.register(reg("d0"))
    r.prefixes.insert("d0", [1, 2])
    r.register(reg("d0", max_model_len=4096))        # the same id may come back
    assert len(r.nodes) == 1 and r.max_model_len() == 4096
    assert r.prefixes.match("d0", [1, 2]) == 0       # its cache restarted empty
    r2 = NodeRegistry(MODEL)
    r2.register(reg("d0"))
    r2.register(reg("d0", block_size=32))            # only node: its own old size is no conflict
    assert r2.block_size() == 32


def test_refused_register_leaves_no_node():
    r = NodeRegistry(MODEL)
    with pytest.raises(ValueError):
        r.register(reg("d0", num_kv_blocks=0))
    assert r.nodes == {}


# ---------------------------------------------------------------- health

def test_heartbeat_and_expire():
    r = NodeRegistry(MODEL, node_timeout_s=1.0)
    assert r.heartbeat(beat("ghost", queued_prefill_tokens=5)) is None
    assert r.nodes == {}
    a, b = r.register(reg("a")), r.register(reg("b"))
    now = time.monotonic()
    a.last_seen = now - 5.0
    b.last_seen = now - 5.0
    assert r.heartbeat(beat("b", num_running=2)) is b
    assert b.last_seen >= now and b.load == {"num_running": 2}
    r.prefixes.insert("a", [1])
    assert r.expire(now - 10.0) == []                # nobody silent that long yet
    assert r.expire(time.monotonic()) == [a]
    assert set(r.nodes) == {"b"} and r.prefixes.match("a", [1]) == 0
    assert r.heartbeat(beat("a")) is None            # forgotten: must register again
    b.last_seen = now - 0.5
    assert r.expire(now) == []                       # 0.5 s < 1 s timeout
    assert r.remove("b") is b and r.remove("b") is None


def test_a_router_that_did_not_run_excuses_the_nodes_silence():
    r = NodeRegistry(MODEL, node_timeout_s=1.0)
    a, b = r.register(reg("a")), r.register(reg("b"))
    now = time.monotonic()
    a.last_seen, b.last_seen = now - 5.0, now - 0.2    # silent 5 s while the router was stopped
    r.excuse(4.5)
    assert r.expire(now) == []                          # 0.5 s and -4.3 s of silence left
    assert r.expire(now + 0.6) == [a]                   # then the usual timeout applies


# ---------------------------------------------------------------- load and picking

def test_queued_tokens_and_as_load():
    r = NodeRegistry(MODEL)
    node = r.register(reg("d0", tp=3))
    assert node.queued_tokens() == 0
    node.pending = {"r1": 100, "r2": 50}
    assert node.queued_tokens() == 150               # router's figure is newer
    r.heartbeat(beat("d0", queued_prefill_tokens=400, num_running=2, num_waiting=1, kv_usage=1.7))
    assert node.queued_tokens() == 400               # heartbeat's figure is larger
    node.pending = {"r3": 1000}
    assert node.queued_tokens() == 1000
    load = node.as_load()
    assert (load.node_id, load.role, load.queued_prefill_tokens, load.num_running,
            load.num_waiting, load.kv_usage, load.tp) == ("d0", "decode", 1000, 2, 1, 1.0, 3)


def test_pick_decode_prefers_cached_prefix_when_loads_equal():
    r = NodeRegistry(MODEL)
    assert r.pick_decode([], 10) is None
    for nid in ("a", "b", "c"):
        r.register(reg(nid))
    prompt = list(range(100, 164))                    # 4 full blocks
    hashes = hash_blocks(prompt, BLOCK)
    r.prefixes.insert("b", hashes[:3])
    r.prefixes.insert("c", hashes[:1])
    node, cached = r.pick_decode(hashes, len(prompt))
    assert node.node_id == "b" and cached == 3 * BLOCK


def test_pick_decode_avoids_heavily_loaded_cached_node():
    r = NodeRegistry(MODEL)
    busy, idle = r.register(reg("busy")), r.register(reg("idle"))
    prompt = list(range(64))
    hashes = hash_blocks(prompt, BLOCK)
    r.prefixes.insert("busy", hashes)
    busy.pending = {"x": 5000}
    node, cached = r.pick_decode(hashes, len(prompt))
    assert node is idle and cached == 0
    busy.pending = {}                                # running requests weigh too
    r.heartbeat(beat("busy", num_running=(len(prompt) // RUNNING_TOKEN_WEIGHT) + 1))
    assert r.pick_decode(hashes, len(prompt))[0] is idle
    r.heartbeat(beat("busy", num_running=1))         # 32 < 64 cached tokens: cache wins
    assert r.pick_decode(hashes, len(prompt)) == (busy, 64)


def test_pick_prefill_least_queued_and_roles():
    r = NodeRegistry(MODEL)
    assert r.pick_prefill(10) is None
    r.register(reg("d0"))
    assert r.pick_prefill(10) is None                # a decode node is not a prefill node
    p0, p1 = r.register(reg("p0", "prefill")), r.register(reg("p1", "prefill"))
    p0.pending = {"a": 300}
    r.heartbeat(beat("p1", queued_prefill_tokens=200))
    assert r.pick_prefill(10) is p1
    p1.pending = {"b": 301}
    assert r.pick_prefill(10) is p0
    assert r.pick_decode([], 10)[0].node_id == "d0"  # prefill nodes never decode
    assert {n.node_id for n in r.of_role("prefill")} == {"p0", "p1"}


def test_max_model_len_is_min_over_decode_nodes():
    r = NodeRegistry(MODEL)
    assert r.max_model_len() is None
    r.register(reg("p0", "prefill", max_model_len=512))
    assert r.max_model_len() is None                 # prefill nodes do not count
    r.register(reg("d0", max_model_len=8192))
    r.register(reg("d1", max_model_len=2048))
    assert r.max_model_len() == 2048
    r.remove("d1")
    assert r.max_model_len() == 8192


# ---------------------------------------------------------------- compute

def test_registered_compute_reaches_the_policy_and_overlap_is_measured():
    r = NodeRegistry(MODEL)
    d = r.register(reg("d0", host="a", boot_id="boot-1", cpus=[2, 3], device="cpu"))
    # another container (other hostname) of the same machine, on cores 0-3
    p = r.register(reg("p0", "prefill", host="b", boot_id="boot-1", cpus=[0, 1, 2, 3],
                       device="cpu"))
    assert d.as_load().compute == Compute("boot-1", frozenset({2, 3}), frozenset(), "cpu")
    assert p.as_load().compute.share_on(d.as_load().compute) == 0.5   # half its cores are d0's
    assert d.compute.share_on(p.compute) == 1.0
    other = r.register(reg("p1", "prefill", host="a", boot_id="boot-2", cpus=[2, 3], device="cpu"))
    assert other.compute.share_on(d.compute) == 0.0                   # another machine
    old = r.register(reg("p2", "prefill"))                            # an older node: says nothing
    assert old.compute == Compute("localhost") and old.compute.share_on(d.compute) == 0.0


def test_gpu_nodes_share_by_gpu_uuid_not_by_cores():
    r = NodeRegistry(MODEL)
    d = r.register(reg("d0", boot_id="b", cpus=[0, 1], device="cuda", gpus=["GPU-1"]))
    same = r.register(reg("p0", "prefill", boot_id="b", cpus=[2], device="cuda", gpus=["GPU-1"]))
    other = r.register(reg("p1", "prefill", boot_id="b", cpus=[0, 1], device="cuda",
                           gpus=["GPU-2", "GPU-3"]))
    cpu = r.register(reg("p2", "prefill", boot_id="b", cpus=[0, 1], device="cpu"))
    assert same.compute.share_on(d.compute) == 1.0
    assert other.compute.share_on(d.compute) == 0.0
    assert cpu.compute.share_on(d.compute) == 0.0


def test_register_refuses_a_bad_compute_report():
    r = NodeRegistry(MODEL)
    with pytest.raises(ValueError, match="compute"):
        r.register(reg("d0", device="tpu"))
    with pytest.raises(ValueError, match="compute"):
        r.register(reg("d0", cpus=[-1]))
