"""``disagg bench transfer`` on a tiny geometry: structure, bit-exactness, clean-up, failures."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import pytest
import torch

from disagg.bench._transfer_procs import ReceiverProc, as_int32, layer_bytes
from disagg.bench.transfer import (TARGETS, TRANSPORTS, BenchGeometry, _Peer, add_transfer_bench_args,
                                   run_transfer_bench)
from transport.shm_transport import SHM_DIR


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_transfer_bench_args(p)
    return p.parse_args(list(argv))


def _shm_files() -> set[str]:
    return {f for f in os.listdir(SHM_DIR) if f.startswith("disagg-kv-")}


def _no_new_shm_files(before: set[str], wait_s: float = 2.0) -> bool:
    """No pool file appeared since ``before`` (another test's short-lived pools may come and go)."""
    deadline = time.monotonic() + wait_s
    while _shm_files() - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_defaults_are_smollm2():
    a = _args()
    assert a.tokens == [512, 2048, 8192] and a.transports == list(TRANSPORTS) and a.repeats == 3
    geo = BenchGeometry(a.num_layers, a.num_kv_heads, a.block_size, a.head_dim, a.dtype)
    assert geo.block_bytes // geo.block_size == 46_080            # one SmolLM2 token
    assert geo.blocks_for(8192) * geo.block_bytes == 377_487_360
    assert geo.blocks_for(17) == 2                                 # a partial block travels whole
    with pytest.raises(ValueError, match="num_layers"):
        BenchGeometry(num_layers=0)
    with pytest.raises(ValueError, match="dtype"):
        BenchGeometry(dtype="int8")
    with pytest.raises(ValueError, match="--tokens"):
        run_transfer_bench(_args("--tokens", "0"))


def test_tiny_run_over_every_transport(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))      # where the ipc sockets go
    shm_before, threads = _shm_files(), torch.get_num_threads()
    out = run_transfer_bench(_args("--tokens", "64", "40", "--num-layers", "2", "--repeats", "1",
                                   "--layerwise", "--timeout", "20"))
    assert out["targets"] == TARGETS and out["memcpy_gbps"] > 0
    assert out["geometry"]["bytes_per_token"] == 2 * 2 * 3 * 64 * 4
    assert out["host"]["cpu_count"] == os.cpu_count()
    rows = out["results"]
    assert {(r["transport"], r["tokens"], r["mode"]) for r in rows} == \
        {(t, n, m) for t in TRANSPORTS for n in (64, 40) for m in ("whole", "layerwise")}
    for r in rows:
        assert r["bit_exact"] is True, r
        assert r["bytes"] == -(-r["tokens"] // 16) * 16 * out["geometry"]["bytes_per_token"]
        assert r["gbps_best"] >= r["gbps_median"] > 0
        key = "memcpy" if r["transport"] == "shm" else "raw"
        assert r[f"{key}_gbps"] > 0
        assert r[f"ratio_vs_{key}"] == pytest.approx(r["gbps_best"] / r[f"{key}_gbps"])
        assert isinstance(r["meets_target"], bool)
    assert list(tmp_path.iterdir()) == [] and _no_new_shm_files(shm_before)   # nothing left behind
    assert torch.get_num_threads() == threads                   # memcpy baseline restored it


def test_verify_catches_a_single_flipped_bit():
    geo = dict(num_layers=2, num_kv_heads=3, block_size=4, head_dim=8, dtype="float32")
    rx = ReceiverProc()
    rx.cmd_setup("zmq-tcp", geo, 5, "tcp://127.0.0.1:*", 5.0)
    try:
        for i, t in enumerate(rx.pool):
            as_int32(t).copy_(layer_bytes(7, i, t))
        assert rx.cmd_verify(7, 5) and not rx.cmd_verify(8, 5)
        as_int32(rx.pool[1][2:3]).view(-1)[5] ^= 1                  # one bit, block 2, layer 1
        assert rx.cmd_verify(7, 2) and not rx.cmd_verify(7, 3)
    finally:
        rx.cmd_teardown()


def _exit_at_once(conn) -> None:
    raise SystemExit(3)


def test_dead_peer_is_reported_not_awaited():
    peer = _Peer(mp.get_context("spawn"), "receiver", _exit_at_once, timeout_s=30.0)
    try:
        with pytest.raises(RuntimeError, match=r"receiver process died \(exit code 3\)"):
            peer.call("expect", "r", 1, 1)
    finally:
        peer.stop()
    assert not peer.proc.is_alive()
