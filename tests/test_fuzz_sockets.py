"""Fuzzing the sockets: 100,000 hostile frames (seeded, ``fuzz_frames``) at the router's
control socket and uplink port, at nodes' control sockets and at KV receivers, then good
traffic: nothing crashed, the good traffic is exact, nothing is left held.

``DISAGG_FUZZ_FRAMES`` (default 100000) and ``DISAGG_FUZZ_SEED`` (default 1) replay or
scale a run; a failure prints its seed.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import zmq

from conftest import hf_greedy, needs_smollm2, random_prompts
from disagg.cluster import ClusterConfig, LocalCluster
from disagg.control import framing
from disagg.control import messages as m
from disagg.sampling_params import SamplingParams
from fake_router import FakeRouter, finished, idle, start_node, tokens_of
from fuzz_frames import FrameFuzzer
from fuzz_messages import RIDS, KVGeometry, to_node, to_router
from kv_fuzz_peer import send_hostile
from serving_helpers import MODEL, greedy_tokens, metrics
from transport.base import TransportConfig
from transport.messages import ErrorCode
from transport.resharding import ReshardPlan
from transport.shm_transport import ShmKVPool, ShmKVReceiver, ShmKVSender
from transport.zmq_transport import ZmqKVReceiver, ZmqKVSender

FRAMES = int(os.environ.get("DISAGG_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("DISAGG_FUZZ_SEED", "1"))
BATCH = 256

# ------------------------------------------------------------------ KV socket
G = KVGeometry(layers=3, blocks=16, heads=2, block_size=4, head_dim=8)
#: requests the receiver expects while fuzzed (hostile frames aim at them)
VICTIMS = {"victim-a": ([3, 7], [1, 1]), "victim-b": ([9, 10, 11], [2, 2, 2]),
           "victim-c": ([12], [5])}
GOOD_DST, GOOD_SRC, GOOD_EPOCHS = [1, 2, 5], [0, 4, 8], [4, 4, 4]
SENTINEL = -7.0


def _serve_fuzz(rx, peer) -> int:
    """Run the receiver while the child ``peer`` (an ``AsyncResult``) fuzzes it; expect
    victims again as they complete, so valid messages keep reaching the write path.
    Returns how many victims completed."""
    handled = completed = 0
    while handled < FRAMES:
        got = rx.poll(5.0)
        if not got:
            if peer.ready():
                peer.get()                      # raises the child's error, if it failed
            pytest.fail(f"receiver got nothing for 5 s after {handled} messages (seed {SEED})")
        handled += got
        for rid in rx.pop_ready():
            completed += 1
            rx.expect(rid, *VICTIMS[rid])
    return completed


@pytest.mark.parametrize("kind", ["zmq", "shm"])
def test_kv_receiver_survives_hostile_frames_then_takes_a_good_transfer(kind, kv_peer):
    g = G
    pool = [torch.full((g.blocks, 2, g.heads, g.block_size, g.head_dim), SENTINEL)
            for _ in range(g.layers)]
    cfg = TransportConfig(kind=kind, max_message_bytes=64 * 1024, timeout_s=10)
    rx = (ShmKVReceiver if kind == "shm" else ZmqKVReceiver)(cfg, pool)
    src = ShmKVPool.create(g.layers, g.blocks, g.heads, g.block_size, g.head_dim) \
        if kind == "shm" else None
    layers = src.layers if src else [torch.empty_like(pool[0]) for _ in range(g.layers)]
    for t in layers:
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)))
    try:
        for rid, (blocks, epochs) in VICTIMS.items():
            rx.expect(rid, blocks, epochs)
        fake = {**(src.info() if src else {"kind": "shm", "dtype": "float32"}),
                "name": "disagg-kv-" + "0" * 32}
        pools = [src.info(), fake] if src else [fake]
        peer = kv_peer.apply_async(send_hostile, (SEED, rx.endpoint, FRAMES, g, VICTIMS, pools))
        completed = _serve_fuzz(rx, peer)
        while not peer.ready():        # messages for unknown requests wait out their grace
            rx.poll(0.05)
        out = peer.get(60)
        replies = out["replies"]
        print(f"{kind}: {FRAMES} frames {out['kinds']}; replies {replies}; "
              f"{completed} victims completed")
        assert out["answered"] == FRAMES                       # one answer per message
        assert ErrorCode.INTERNAL not in replies, replies      # no handler bug was hit
        assert replies.get("Ack") and completed                # valid ones did get written
        for rid in VICTIMS:
            rx.cancel(rid)
        rx.pop_ready()
        assert rx.pending_request_ids() == set()
        victim_blocks = {b for blocks, _ in VICTIMS.values() for b in blocks}
        others = [b for b in range(g.blocks) if b not in victim_blocks]
        assert all(bool((t[others] == SENTINEL).all()) for t in pool), \
            "a write outside the expected blocks"

        # a frame over the socket's size limit: that link is dropped, the receiver is fine
        ctx = zmq.Context()
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(rx.endpoint)
        big.send(b"\x00" * (cfg.max_message_bytes + (1 << 20) + 1))
        assert rx.poll(0.5) == 0
        big.close(0)
        ctx.term()

        # then a real sender's transfer lands bit-exact and nothing stays pending
        plan = ReshardPlan(g.heads, 1, 1)
        tx = ShmKVSender(cfg, src, plan) if src else ZmqKVSender(cfg, layers, plan)
        hello = threading.Thread(target=tx.connect, args=(0, rx.endpoint))
        hello.start()
        while hello.is_alive():
            rx.poll(0.01)
        hello.join()
        rx.expect("good", GOOD_DST, GOOD_EPOCHS)
        tid = tx.send("good", 0, GOOD_SRC, GOOD_DST, GOOD_EPOCHS)
        while not rx.is_ready("good"):
            assert rx.poll(5.0), "the good transfer did not arrive"
        tx.wait(tid, 5)
        assert rx.pop_ready() == {"good"} and rx.pending_request_ids() == set()
        assert len(tx.pins) == 0
        for t, s in zip(pool, layers):
            assert torch.equal(t[GOOD_DST], s[GOOD_SRC])
        untouched = [b for b in others if b not in GOOD_DST]
        assert all(bool((t[untouched] == SENTINEL).all()) for t in pool)
        tx.close()
    finally:
        rx.close()
        if src:
            src.close()


@pytest.fixture(scope="module")
def kv_peer():
    """A child process for the hostile side of the KV fuzz (both cores busy)."""
    with mp.get_context("spawn").Pool(1) as pool:
        yield pool


# ---------------------------------------------------------------- node control sockets
NODE_IDS = {"decode": "decode-fz", "prefill": "prefill-fz"}


def _fuzz_nodes(router: FakeRouter, fuzzers: dict, procs: dict, frames: int) -> dict:
    """Send ``frames`` hostile messages, alternating between the nodes; return the
    request ids each was asked to take (every frame that decodes is looked at)."""
    rids = {nid: set() for nid in fuzzers}
    order = list(fuzzers)
    skipped = 0
    for i in range(frames):
        nid = order[i % len(order)]
        parts = fuzzers[nid].next()
        msgs = []
        for part in parts:
            with contextlib.suppress(m.ControlError):
                msgs.append(m.decode(part))
        if any(isinstance(x, m.Refused) for x in msgs):
            skipped += 1             # a node exits on Refused: by design, not a crash
            continue
        rids[nid].update(x.rid for x in msgs if isinstance(x, (m.Generate, m.Prefill)))
        try:
            router.send(nid, *parts)
        except zmq.ZMQError:             # unreachable (gone) or not reading for 20 s
            _check_alive(procs, i, wait_s=2.0)
            raise
        if i % BATCH == 0:
            router.serve()
            for pump in router.pumps:
                pump()
            _check_alive(procs, i)
    print(f"node fuzz: {frames} frames ({skipped} Refused skipped), "
          f"{ {n: f.counts for n, f in fuzzers.items()} }; from nodes {dict(router.received)}")
    return rids


def _check_alive(procs: dict, sent: int, wait_s: float = 0.0) -> None:
    """Fail naming the nodes that exited (watching ``wait_s`` for an exit to show)."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        if dead:
            pytest.fail(f"node(s) exited after {sent} frames: {dead} (seed {SEED}); see "
                        f"their logs")
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def test_nodes_survive_hostile_control_frames_then_serve_exactly(tiny_llama, tmp_path):
    ctx = zmq.Context()
    router = FakeRouter(ctx)
    sink = ZmqKVReceiver(TransportConfig(timeout_s=5),
                         [torch.zeros(64, 2, 2, 16, 16) for _ in range(3)])   # tiny model's pool
    router.pumps.append(sink.poll)
    procs = {NODE_IDS[r]: start_node(r, NODE_IDS[r], router.address, tiny_llama, tmp_path)
             for r in ("decode", "prefill")}
    ok = False
    try:
        router.wait(lambda: set(router.registered) == set(procs), 120, "both nodes to register")
        vocab = router.registered["decode-fz"].vocab_size
        fds = {nid: psutil.Process(p.pid).num_fds() for nid, p in procs.items()}
        fuzzers = {nid: FrameFuzzer(SEED + i, to_node(list(NODE_IDS.values()), vocab, 16,
                                                      [sink.endpoint]), "type", list(m.MESSAGES))
                   for i, nid in enumerate(procs)}
        rids = _fuzz_nodes(router, fuzzers, procs, FRAMES)

        # what a router does for requests it does not know: abort them
        for nid, taken in rids.items():
            for rid in taken | set(RIDS):
                router.send_msg(nid, m.Abort(rid))
        router.wait(lambda: all(idle(x) for x in router.fresh_loads(procs).values()), 60,
                    lambda: f"idle nodes (last loads {router.loads})")

        # good traffic: a local request, then a remote one (prefill → KV → decode)
        prompt = random.Random(SEED).sample(range(vocab), 20)
        want = hf_greedy(tiny_llama, prompt, 8)
        params = SamplingParams(max_tokens=8, temperature=0).to_dict()
        local = router.request("decode-fz", m.Generate("good-local", prompt, params, False),
                               finished, "the local request's end")
        assert tokens_of(local) == want
        got = router.request("decode-fz", m.Generate("good-remote", prompt, params, True),
                             lambda xs: any(isinstance(x, m.KVTarget) for x in xs), "a KV target")
        target = next(x for x in got if isinstance(x, m.KVTarget)).target
        got = router.request("prefill-fz", m.Prefill("good-remote", prompt, params, target),
                             lambda xs: any(isinstance(x, m.FirstToken) for x in xs),
                             "the first token")
        first = next(x for x in got if isinstance(x, m.FirstToken))
        got = router.request("decode-fz", first,
                             lambda xs: finished(xs) and any(isinstance(x, m.KVSent) for x in xs),
                             "the remote request's end")
        assert [first.token_id] + tokens_of(got) == want
        assert next(x for x in got if isinstance(x, m.KVSent)).error is None
        assert next(x for x in got if isinstance(x, m.Tokens) and x.finished).route == "remote"
        router.wait(lambda: all(idle(x) for x in router.fresh_loads(procs).values()), 30,
                    lambda: f"idle nodes after the good requests (last loads {router.loads})")
        assert all(p.poll() is None for p in procs.values())
        grown = {nid: psutil.Process(p.pid).num_fds() - fds[nid] for nid, p in procs.items()}
        print(f"open descriptors gained over the fuzz: {grown}")
        # a link kept to the sink receiver costs ~15 (2 TCP, ZeroMQ mailboxes and monitors);
        # one left behind per hostile target would be hundreds
        assert all(n < 64 for n in grown.values()), grown
        ok = True
    finally:
        for p in procs.values():             # a clean stop when all went well, else no waiting
            p.send_signal(signal.SIGTERM if ok else signal.SIGKILL)
        codes = {}
        for nid, p in procs.items():
            try:
                codes[nid] = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[nid] = p.wait()
        router.close()
        sink.close()
        ctx.term()
    assert codes == {nid: 0 for nid in procs}, codes


# ---------------------------------------------------------------- router control socket
#: the fuzzing peers: two named, a heartbeat-style one, an anonymous one (identities of
#: the real node's sockets: see the identity test below); their messages claim any id
ROUTER_PEERS = (b"fz-0", b"fz-1", b"hb:fz-0", None)
DEAF = b"fz-1"                       # never reads what the router answers
NODE_GAUGES = ("disagg_queue_depth", "disagg_kv_usage_ratio", "disagg_node_requests",
               "disagg_node_kv_blocks_used", "disagg_node_pinned_requests", "disagg_node_kv_sends")


class UplinkPeer:
    """A fuzzing peer on the router's uplink port: each connection it opens begins with
    ``hello`` (None: with whatever it sends first, which the router cuts), and ``on_open``
    runs after (to send the matching ``UplinkSwitch``). Reconnects when the router cut it."""

    def __init__(self, port: int, hello: bytes | None = None, on_open=lambda: None) -> None:
        self.port, self.hello, self.on_open = port, hello, on_open
        self.sock: socket.socket | None = None
        self.opened = 0

    def send(self, parts: list[bytes], rng: random.Random) -> None:
        data = b"".join(framing.framed(p) for p in parts if len(p) <= framing.MAX_FRAME_BYTES)
        if rng.random() < 0.01:
            data = rng.randbytes(4) + data           # a length that is not one
        for _ in range(2):
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
                self.opened += 1
                if self.hello is not None:
                    self.sock.sendall(framing.framed(self.hello))
                self.on_open()
            try:
                self.sock.sendall(data)
                return
            except OSError:                           # cut by the router: open another
                self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _node_gauges(url: str) -> dict:
    """The decode node's load gauges (those this router exports)."""
    return {name: v for (name, labels), v in metrics(url).items()
            if name in NODE_GAUGES and dict(labels).get("node") == "decode-0"}


def _only_the_real_node(c: LocalCluster, timeout_s: float) -> None:
    """Wait until the router knows just ``decode-0`` (the fuzzers' fake nodes expired)."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = c.health()
        if h["decode_nodes"] == 1 and set(h.get("nodes", {"decode-0": 0})) == {"decode-0"}:
            return
        assert time.monotonic() < deadline, f"not only decode-0 registered: {h}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory):
    """A router with one decode node (SmolLM2); both must exit cleanly at the end."""
    cfg = ClusterConfig(log_dir=str(tmp_path_factory.mktemp("fuzz-cluster")), num_prefill=0,
                        node_args=("--kv-cache-memory", "64MiB", "--max-num-seqs", "4"))
    with LocalCluster(cfg) as c:
        c.start()
        yield c
        codes = c.stop()
    assert codes == {"router": 0, "decode-0": 0}, codes


@needs_smollm2
@pytest.mark.slow
def test_router_survives_hostile_control_frames_then_serves_exactly(fuzz_cluster):
    c, url = fuzz_cluster, fuzz_cluster.http_url
    prompts = random_prompts(2, 49152, 20, 40, seed=SEED)
    baseline = [greedy_tokens(url, p, 10) for p in prompts]
    router = psutil.Process(c.procs["router"].pid)
    rss = router.memory_info().rss
    ctx = zmq.Context()
    peers = []
    for ident in ROUTER_PEERS:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 20_000)
        if ident:
            s.setsockopt(zmq.IDENTITY, ident)
        s.connect(c.control_address)
        peers.append((ident, s))
    fz0 = peers[0][1]
    uplinks = [UplinkPeer(c.router_uplink_ports[0], m.encode(m.UplinkHello("fz-0", 4242)),
                          lambda: fz0.send(m.encode(m.UplinkSwitch("fz-0", 4242)))),
               UplinkPeer(c.router_uplink_ports[0])]
    fuzzer = FrameFuzzer(SEED, to_router(["decode-0", "fz-0", "fz-1", "hb:fz-0", "ghost"],
                                         MODEL), "type", list(m.MESSAGES))
    replies: collections.Counter = collections.Counter()
    try:
        for i in range(FRAMES):
            j = fuzzer.rng.randrange(len(peers) + len(uplinks))
            if j < len(peers):
                peers[j][1].send_multipart(fuzzer.next())
            else:
                uplinks[j - len(peers)].send(fuzzer.next(), fuzzer.rng)
            if i % BATCH == 0:
                for ident, s in peers:
                    while ident != DEAF and s.poll(0):
                        replies[type(m.decode(s.recv())).__name__] += 1
                dead = {n: p.returncode for n, p in c.procs.items() if p.poll() is not None}
                assert not dead, f"exited after {i} frames: {dead} (seed {SEED})"
    finally:
        for _, s in peers:
            s.close(0)
        ctx.term()
        for up in uplinks:
            up.close()
    grown = router.memory_info().rss - rss
    print(f"router fuzz: {FRAMES} frames {fuzzer.counts}; answers {dict(replies)}; uplinks "
          f"opened {[up.opened for up in uplinks]}; router RSS {rss / 2**20:.0f} MiB before, "
          f"+{grown / 2**20:.1f} MiB after")
    assert grown < 64 << 20                  # nothing kept per frame (e.g. unsent answers)

    # the fuzzers' fake nodes expire; the real node's heartbeats reset its gauges
    _only_the_real_node(c, 30)
    time.sleep(1.5)
    gauges = _node_gauges(url)
    assert gauges and all(v == 0 for v in gauges.values()), gauges
    assert all(p.poll() is None for p in c.procs.values())
    assert [greedy_tokens(url, p, 10) for p in prompts] == baseline
    log = (Path(c.config.log_dir) / "router.log").read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 300:][:3000]
    # each complaint's template is let through 10 times per 10 s (disagg.log_setup): without
    # the limit this run wrote ~56,000 lines (7 MB)
    assert log.count("\n") < 3000 and "more are suppressed" in log, log.count("\n")
