"""ZeroMQ KV transport between two processes (spawned), plus PinTable bookkeeping."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from transport.base import TransportConfig, TransportError, TransportTimeout, missing_blocks
from transport.pins import PinTable
from transport.resharding import ReshardPlan, kv_heads_of_rank
from transport.zmq_transport import ZmqKVReceiver, ZmqKVSender

L, N, B, D = 3, 16, 4, 8
BLOCK_BYTES = 2 * B * D * 4                       # one head of one block of one layer, fp32


def global_pool(k: int, seed: int = 0) -> torch.Tensor:
    """(L, N, 2, K, B, D) deterministic 'prefill' KV with all global heads."""
    return torch.randn(L, N, 2, k, B, D, generator=torch.Generator().manual_seed(seed))


def rank_pool(k: int, tp: int, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer caches of one prefill rank, shaped like its TP cache."""
    full = global_pool(k, seed)[:, :, :, list(kv_heads_of_rank(k, tp, rank))]
    return [t.contiguous() for t in full.unbind(0)]


def run_sender(job: dict) -> dict:
    """Child process: play prefill ranks ``job['ranks']`` and send ``job['transfers']``."""
    k, p, d = job["k"], job["p"], job["d"]
    cfg = TransportConfig(kind=job["kind"], timeout_s=10)
    plan = ReshardPlan(k, p, d)
    out = {"bytes_sent": 0, "errors": [], "released": []}
    keep = []
    for r in job["ranks"]:
        if job["kind"] == "shm":
            from transport.shm_transport import ShmKVPool, ShmKVSender
            src = rank_pool(k, p, r)
            pool = ShmKVPool.create(L, N, src[0].shape[2], B, D)
            for dst_t, src_t in zip(pool.layers, src):
                dst_t.copy_(src_t)
            tx = ShmKVSender(cfg, pool, plan, r, on_release=lambda *a: out["released"].append(a[2]))
            keep.append(pool)
        else:
            tx = ZmqKVSender(cfg, rank_pool(k, p, r), plan, r,
                             on_release=lambda *a: out["released"].append(a[2]))
        for q in plan.dst_ranks(r):
            tx.connect(q, job["endpoints"][q])
        for t in job["transfers"]:
            for q in plan.dst_ranks(r):
                if t.get("layerwise"):
                    tid = None
                    for layer in range(L):
                        tid = tx.send(t["rid"], q, t["src"], t["dst"], t["epochs"], (layer, layer + 1),
                                      final=layer == L - 1, transfer_id=tid)
                else:
                    tid = tx.send(t["rid"], q, t["src"], t["dst"], t["epochs"])
                try:
                    tx.wait(tid, timeout_s=10)
                except TransportError as exc:
                    out["errors"].append(str(exc))
        out["bytes_sent"] += tx.bytes_sent
        assert len(tx.pins) == 0
        tx.close()
    for pool in keep:
        pool.close()
    return out


@pytest.fixture(scope="module")
def child():
    with mp.get_context("spawn").Pool(1) as pool:
        yield pool


def transfer(child, receivers, job: dict) -> dict:
    """Run ``job`` in the child while this process serves ``receivers``."""
    job["endpoints"] = {q: rx.endpoint for q, rx in enumerate(receivers)}
    res = child.apply_async(run_sender, (job,))
    deadline = time.monotonic() + 60
    while not res.ready():
        assert time.monotonic() < deadline, "sender process did not finish"
        for rx in receivers:
            rx.poll(0.005)
    return res.get()


def make_receivers(kind, k, d, addr, rx_cls=ZmqKVReceiver):
    """One receiver per decode rank; ``addr`` may contain ``{q}`` (needed for ipc://)."""
    return [rx_cls(TransportConfig(kind=kind, address=addr.format(q=q), timeout_s=10),
                   [torch.zeros(N, 2, len(kv_heads_of_rank(k, d, q)), B, D) for _ in range(L)],
                   tp_rank=q, tp_size=d) for q in range(d)]


def check_blocks(receivers, k, d, src, dst, untouched=()):
    full = global_pool(k)
    for q, rx in enumerate(receivers):
        heads = list(kv_heads_of_rank(k, d, q))
        for layer in range(L):
            want = full[layer][src][:, :, heads]
            assert torch.equal(rx.kv_caches[layer][dst], want), (q, layer)
            assert not rx.kv_caches[layer][list(untouched)].any()


@pytest.mark.parametrize("addr,layerwise", [("tcp://127.0.0.1:*", False), ("ipc", True)])
def test_bit_exact_whole_and_layerwise(child, tmp_path, addr, layerwise):
    addr = f"ipc://{tmp_path}/rx" if addr == "ipc" else addr
    (rx,) = make_receivers("zmq", 2, 1, addr)
    src, dst = [4, 5, 6, 11], [9, 1, 2, 3]            # src contiguous-ish, dst scattered
    rx.expect("r1", dst, [2, 2, 2, 2])
    out = transfer(child, [rx], dict(kind="zmq", k=2, p=1, d=1, ranks=[0], transfers=[
        dict(rid="r1", src=src, dst=dst, epochs=[2, 2, 2, 2], layerwise=layerwise)]))
    assert out["errors"] == [] and out["released"] == ["acked"]
    assert rx.pop_ready() == {"r1"}
    check_blocks([rx], 2, 1, src, dst, untouched=[0, 4, 5])
    assert out["bytes_sent"] == rx.bytes_received == 4 * L * 2 * BLOCK_BYTES
    rx.close()


@pytest.mark.parametrize("p,d", [(2, 1), (1, 2)])
def test_resharded_transfer_is_bit_exact(child, p, d):
    receivers = make_receivers("zmq", 2, d, "tcp://127.0.0.1:*")
    src, dst = [0, 1, 2], [5, 6, 7]                   # contiguous: zero-copy path when all heads
    for rx in receivers:
        rx.expect("r", dst, [1, 1, 1])
    out = transfer(child, receivers, dict(kind="zmq", k=2, p=p, d=d, ranks=list(range(p)),
                                          transfers=[dict(rid="r", src=src, dst=dst, epochs=[1] * 3)]))
    assert out["errors"] == []
    assert all(rx.pop_ready() == {"r"} for rx in receivers)
    check_blocks(receivers, 2, d, src, dst, untouched=[0, 1, 2, 8])
    for rx in receivers:
        rx.close()


def test_only_missing_blocks_are_sent_and_epochs_checked(child):
    (rx,) = make_receivers("zmq", 2, 1, "tcp://127.0.0.1:*")
    src_all, dst_all, epochs = [3, 4, 5, 6, 7], [10, 11, 12, 13, 14], [5, 5, 5, 5, 5]
    src, dst, ep = missing_blocks(src_all, dst_all, epochs, num_local_tokens=2 * B + 1, block_size=B)
    assert dst == [12, 13, 14]
    rx.expect("hit", dst, ep)
    rx.expect("stale", [1], [4])
    out = transfer(child, [rx], dict(kind="zmq", k=2, p=1, d=1, ranks=[0], transfers=[
        dict(rid="hit", src=src, dst=dst, epochs=ep), dict(rid="stale", src=[0], dst=[1], epochs=[3])]))
    # on the wire: 3 of the 5 "hit" blocks (2 are local) + the 1 "stale" block
    assert out["bytes_sent"] == (3 + 1) * L * 2 * BLOCK_BYTES
    assert rx.bytes_received == 3 * L * 2 * BLOCK_BYTES             # the stale one was rejected
    assert len(out["errors"]) == 1 and "epoch_mismatch" in out["errors"][0]
    assert out["released"] == ["acked", "error"]
    assert rx.pop_ready() == {"hit"} and not rx.is_ready("stale")
    check_blocks([rx], 2, 1, src, dst, untouched=[1, 10, 11])
    rx.close()


def test_waits_time_out():
    (rx,) = make_receivers("zmq", 2, 1, "tcp://127.0.0.1:*")
    rx.expect("r", [1], [1])
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout, match="still missing"):
        rx.wait_ready("r", timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    tx = ZmqKVSender(TransportConfig(), rank_pool(2, 1, 0), ReshardPlan(2, 1, 1))
    with pytest.raises(TransportTimeout, match="no HELLO"):
        tx.connect(0, rx.endpoint, timeout_s=0.2)          # receiver never polled
    tx.close()
    rx.close()


def test_config_rejects_bad_values():
    for kw in (dict(kind="rdma"), dict(address="http://x"), dict(lease_s=0), dict(timeout_s=-1),
               dict(max_message_bytes=0), dict(kind="shm", address="tcp://10.0.0.1:5"),
               dict(curve_server_secret=b"x" * 40)):
        with pytest.raises(ValueError):
            TransportConfig(**kw)


def test_pin_table_lease_and_idempotent_acks():
    released = []
    now = [100.0]
    pins = PinTable(lease_s=30.0, on_release=lambda t, b, why: released.append((t, b, why)),
                    clock=lambda: now[0])
    pins.pin("a", [1, 2])
    pins.pin("a", [2, 3])                                   # layer-wise: same transfer, same lease
    pins.pin("b", [4])
    assert pins.pinned() == {"a": [1, 2, 3], "b": [4]}
    assert pins.ack("a") is True and pins.ack("a") is False
    assert pins.expire(now=129.9) == []
    assert pins.expire(now=130.0) == ["b"]
    assert pins.ack("b") is False                           # late ack after expiry: harmless
    assert released == [("a", [1, 2, 3], "acked"), ("b", [4], "expired")]
    assert len(pins) == 0
    with pytest.raises(ValueError):
        PinTable(lease_s=0)


def test_curve_encrypted_transfer_in_process():
    import threading

    import zmq
    public, secret = zmq.curve_keypair()
    cfg = TransportConfig(curve_server_public=public, curve_server_secret=secret, timeout_s=5)
    rx = ZmqKVReceiver(cfg, [torch.zeros(N, 2, 2, B, D) for _ in range(L)])
    tx = ZmqKVSender(TransportConfig(curve_server_public=public, timeout_s=5), rank_pool(2, 1, 0),
                     ReshardPlan(2, 1, 1))
    t = threading.Thread(target=rx.poll, args=(5.0,))
    t.start()
    tx.connect(0, rx.endpoint)
    t.join()
    rx.expect("c", [2, 3], [1, 1])
    tid = tx.send("c", 0, [7, 8], [2, 3], [1, 1])
    rx.wait_ready("c", 5)
    tx.wait(tid, 5)
    check_blocks([rx], 2, 1, [7, 8], [2, 3], untouched=[0, 1, 4])
    tx.close()
    rx.close()


def test_kv_that_comes_before_its_announcement_waits_for_it():
    """A decode node answers with a KV target while its ranks run a step and announces the
    blocks to them only at the next step: blocks that arrive in between are kept (not
    rejected) until ``expect``; never announced, they are rejected after the grace period;
    for a request cancelled here they are rejected at once."""
    import threading

    from transport.pending import EarlyMessages
    cfg = TransportConfig(timeout_s=5)
    rx = ZmqKVReceiver(cfg, [torch.zeros(N, 2, 2, B, D) for _ in range(L)])
    rx._early = EarlyMessages(grace_s=0.3)
    tx = ZmqKVSender(cfg, rank_pool(2, 1, 0), ReshardPlan(2, 1, 1))
    t = threading.Thread(target=rx.poll, args=(5.0,))
    t.start()
    tx.connect(0, rx.endpoint)
    t.join()

    def finished(timeout_s):
        deadline, got = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline and not got:
            rx.poll(0.01)
            tx.poll(0.01)
            got = tx.finished()
        return got

    early = tx.send("early", 0, [7, 8], [2, 3], [1, 1])
    assert finished(0.1) == [] and len(rx._early) == 1        # kept, not answered
    rx.expect("early", [2, 3], [1, 1])                        # the next step announces it
    assert [(tid, err) for tid, _, err in finished(2)] == [(early, None)]
    assert rx.pop_ready() == {"early"}
    check_blocks([rx], 2, 1, [7, 8], [2, 3], untouched=[0, 1, 4])

    t0 = time.monotonic()
    never = tx.send("never", 0, [5], [6], [1])
    ((tid, _, err),) = finished(3)
    assert tid == never and "unknown_request" in err and time.monotonic() - t0 >= 0.3

    rx.expect("gone", [9], [1])
    rx.cancel("gone")
    t0 = time.monotonic()
    gone = tx.send("gone", 0, [5], [9], [1])
    ((tid, _, err),) = finished(3)
    assert tid == gone and "unknown_request" in err and time.monotonic() - t0 < 0.3
    assert len(rx._early) == 0 and not rx.kv_caches[0][[6, 9]].any()
    tx.close()
    rx.close()


def test_an_id_the_wire_cannot_carry_fails_at_once_on_the_sender():
    """A receiver cuts the ids it echoes in an ERROR to MAX_ID_LEN, so a reply about a
    longer transfer id could not be matched and the blocks stayed pinned for the lease
    (30 s; seen fuzzing a prefill node). The sender refuses such an id instead."""
    from transport.wire import MAX_ID_LEN
    cfg = TransportConfig(timeout_s=5)
    rx = ZmqKVReceiver(cfg, [torch.zeros(N, 2, 2, B, D) for _ in range(L)])
    tx = ZmqKVSender(cfg, rank_pool(2, 1, 0), ReshardPlan(2, 1, 1))
    tx.connect(0, rx.endpoint, wait=False)
    try:
        with pytest.raises(ValueError, match="request_id length 300 not in 1..256"):
            tx.send("r" * 300, 0, [1], [2], [1])
        with pytest.raises(ValueError, match="transfer_id length 257 not in 1..256"):
            tx.send("r", 0, [1], [2], [1], transfer_id="t" * (MAX_ID_LEN + 1))
        assert len(tx.pins) == 0 and tx.finished() == [] and tx.bytes_sent == 0
        rid = "r" * (MAX_ID_LEN - len("/0->0"))            # the longest that fits
        assert tx.send(rid, 0, [1], [2], [1]) == rid + "/0->0"
    finally:
        tx.close()
        rx.close()


def test_early_messages_are_bounded():
    from transport.pending import EarlyMessages
    early = EarlyMessages(grace_s=10, max_messages=3, max_bytes=100)
    assert early.park("a", 1, 40) and early.park("b", 2, 40)
    assert not early.park("a", 3, 40)                         # 120 bytes > 100
    assert early.park("a", 4, 10) and not early.park("c", 5, 1)   # 3 messages kept
    assert early.take("a") == [1, 4] and len(early) == 1
    assert early.expired(time.monotonic() + 11) == [2] and len(early) == 0
