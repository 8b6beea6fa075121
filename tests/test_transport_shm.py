"""Shared-memory KV transport: the receiver copies out of a spawned sender's pool."""

from __future__ import annotations

import multiprocessing as mp
import os

import msgpack
import pytest
import torch
import zmq

from test_transport_zmq import BLOCK_BYTES, L, check_blocks, make_receivers, transfer
from transport.shm_transport import ShmKVPool, ShmKVReceiver
from transport.messages import Error, ErrorCode, Hello
from transport.wire import decode_header, encode


@pytest.fixture(scope="module")
def child():
    with mp.get_context("spawn").Pool(1) as pool:
        yield pool


def _addr(tmp_path):
    return f"ipc://{tmp_path}/rx"


@pytest.mark.parametrize("layerwise", [False, True])
def test_bit_exact_over_shm(child, tmp_path, layerwise):
    (rx,) = make_receivers("shm", 2, 1, _addr(tmp_path), ShmKVReceiver)
    src, dst = [2, 9, 4], [0, 7, 3]
    rx.expect("r", dst, [1, 1, 1])
    out = transfer(child, [rx], dict(kind="shm", k=2, p=1, d=1, ranks=[0], transfers=[
        dict(rid="r", src=src, dst=dst, epochs=[1, 1, 1], layerwise=layerwise)]))
    assert out["errors"] == [] and out["released"] == ["acked"]
    assert out["bytes_sent"] == 0                               # only control messages travel
    assert rx.bytes_received == 3 * L * 2 * BLOCK_BYTES
    check_blocks([rx], 2, 1, src, dst, untouched=[1, 2, 4])
    rx.close()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("disagg-kv-")] \
        if os.path.isdir("/dev/shm") else True


@pytest.mark.parametrize("p,d", [(2, 1), (1, 2)])
def test_resharded_over_shm_with_prefix_hit(child, tmp_path, p, d):
    receivers = make_receivers("shm", 2, d, f"ipc://{tmp_path}/rx{{q}}", ShmKVReceiver)
    src, dst = [5, 6, 7], [1, 2, 3]                             # the receiver already holds block 0
    for rx in receivers:
        rx.expect("r", dst, [4, 4, 4])
    out = transfer(child, receivers, dict(kind="shm", k=2, p=p, d=d, ranks=list(range(p)), transfers=[
        dict(rid="r", src=src, dst=dst, epochs=[4, 4, 4]), dict(rid="r", src=[0], dst=[9], epochs=[4])]))
    # the second transfer targets a block the receiver never announced: one ERROR per
    # sending (prefill, decode) pair, and nothing is written
    assert len(out["errors"]) == 2 and all("block_not_expected" in e for e in out["errors"])
    check_blocks(receivers, 2, d, src, dst, untouched=[0, 4, 9])
    assert all(rx.pop_ready() == {"r"} for rx in receivers)
    for rx in receivers:
        rx.close()


def test_pool_lifetime_and_unknown_pools(tmp_path):
    pool = ShmKVPool.create(L, 4, 2, 4, 8)
    other = ShmKVPool.open(pool.info())
    pool.layers[1][2].fill_(3.0)
    assert torch.equal(other.layers[1][2], pool.layers[1][2])   # same memory
    other.close()
    assert os.path.exists(pool.path)
    pool.close()
    assert not os.path.exists(pool.path)
    with pytest.raises(ValueError, match="disagg-kv"):
        ShmKVPool.open({**pool.info(), "name": "../etc/passwd"})

    (rx,) = make_receivers("shm", 2, 1, _addr(tmp_path), ShmKVReceiver)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rx.endpoint)
    for info, code in [({"kind": "shm", "name": pool.name}, ErrorCode.UNKNOWN_POOL),
                       ({"kind": "tcp"}, ErrorCode.UNKNOWN_POOL)]:
        hello = Hello(0, 1, L, 4, 2, 4, 8, "float32", info)
        sock.send(encode(hello))
        assert rx.poll(2.0) == 1 and sock.poll(2000)
        assert decode_header(sock.recv(), (Error,)).code == code
    sock.send(msgpack.packb({"v": 1, "kind": "kv_blocks"}))
    assert rx.poll(2.0) == 1 and sock.poll(2000)
    assert decode_header(sock.recv(), (Error,)).code == ErrorCode.FIELD
    sock.close(linger=0)
    rx.close()


def _create_pool_and_wait(conn) -> None:
    """Child: create a pool, report its name, then sleep until killed."""
    import time as _time
    pool = ShmKVPool.create(L, 4, 2, 4, 8)
    conn.send(pool.name)
    _time.sleep(600)


def test_pools_of_killed_creators_are_swept_live_ones_kept():
    import signal
    from transport.shm_transport import SHM_DIR, sweep_stale_pools
    ctx = mp.get_context("spawn")
    procs, names = [], []
    for _ in range(2):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_create_pool_and_wait, args=(theirs,), daemon=True)
        proc.start()
        assert ours.poll(60)
        procs.append(proc)
        names.append(ours.recv())
    dead, alive = names
    os.kill(procs[0].pid, signal.SIGKILL)       # no chance to unlink: the file stays
    procs[0].join(10)
    assert os.path.exists(os.path.join(SHM_DIR, dead))
    assert sweep_stale_pools(min_age_s=3600) == []      # too young to be judged
    swept = sweep_stale_pools(min_age_s=0)
    assert dead in swept and alive not in swept         # the live creator holds its lock
    assert not os.path.exists(os.path.join(SHM_DIR, dead))
    assert os.path.exists(os.path.join(SHM_DIR, alive))
    procs[1].terminate()
    procs[1].join(10)
    sweep_stale_pools(min_age_s=0)
    assert not os.path.exists(os.path.join(SHM_DIR, alive))


def test_receiver_unmaps_the_pools_of_gone_senders(tmp_path):
    (rx,) = make_receivers("shm", 2, 1, _addr(tmp_path), ShmKVReceiver)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rx.endpoint)

    def hello(pool):
        sock.send(encode(Hello(0, 1, L, 4, 2, 4, 8, "float32", pool.info())))
        assert rx.poll(2.0) == 1 and sock.poll(2000)
        assert isinstance(decode_header(sock.recv(), (Hello, Error)), Hello)

    first = ShmKVPool.create(L, 4, 2, 4, 8)
    hello(first)
    assert set(rx._peer_pools) == {first.name}
    first.close()                                # the sender went away (a restart follows)
    second = ShmKVPool.create(L, 4, 2, 4, 8)
    hello(second)
    assert set(rx._peer_pools) == {second.name}  # the dead pool's pages are not kept mapped
    sock.close(linger=0)
    rx.close()
    second.close()
