"""``disagg bench transfer``: KV transfer throughput against raw pyzmq and memcpy.

Moves the KV of ``--tokens`` tokens (default SmolLM2 geometry: 30 layers, 3 KV
heads, head_dim 64, fp32, 46,080 bytes per token) from a sender process to a
receiver process over each transport, and in the same run measures the two
ceilings it is judged against::

    zmq-tcp / zmq-ipc   ZmqKVSender ─KV─▶ ZmqKVReceiver   vs  raw pyzmq PUSH/PULL, same
                                                              bytes as 30 frames, time to ack
    shm                 ShmKVSender ─ctl─▶ ShmKVReceiver  vs  single-core dst.copy_(src)
                        (receiver copies out of the sender's /dev/shm pool)

A transfer is timed on the sender from just before ``send()`` until
``wait()`` returns (the ACK means every byte is in the receiver's pool). One
verified warm-up per (transport, size, mode), then ``--repeats`` timed runs,
raw and ours interleaved so drift on a shared machine hits both alike.
Targets: zmq ≥ 0.8 × raw pyzmq at the same size; shm ≥ 0.5 × memcpy.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from transport.wire import DTYPES

from ._transfer_procs import pack, receiver_main, sender_main, unpack

TRANSPORTS = ("zmq-tcp", "zmq-ipc", "shm")
TARGETS = {"zmq_vs_raw": 0.8, "shm_vs_memcpy": 0.5}


@dataclass(frozen=True)
class BenchGeometry:
    """The KV pool shape being moved (per layer ``(blocks, 2, heads, block_size, head_dim)``)."""

    num_layers: int = 30
    num_kv_heads: int = 3
    block_size: int = 16
    head_dim: int = 64
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "block_size", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (K and V)."""
        itemsize = DTYPES[self.dtype].itemsize
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * itemsize

    def blocks_for(self, tokens: int) -> int:
        """Blocks holding ``tokens`` tokens (a partial last block travels whole)."""
        return -(-tokens // self.block_size)


def add_transfer_bench_args(p: argparse.ArgumentParser) -> None:
    """Add the ``disagg bench transfer`` flags to ``p``."""
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192],
                   help="token counts whose KV is moved")
    p.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (best and median reported)")
    p.add_argument("--layerwise", action="store_true",
                   help="also measure layer-by-layer sends (one message per layer)")
    p.add_argument("--json", action="store_true", help="print compact JSON")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-layers", type=int, default=30)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds any one step may take before the bench gives up")
    p.add_argument("--seed", type=int, default=0, help="seed of the KV bytes (checked bit for bit)")


class _Peer:
    """A spawned child and the parent's end of its command Pipe; every wait is bounded."""

    def __init__(self, ctx, name: str, target, timeout_s: float) -> None:
        self.name, self.timeout_s = name, timeout_s
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn,), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child_conn.close()

    def send(self, *cmd) -> None:
        """Send one command without waiting for its reply."""
        try:
            self.conn.send_bytes(pack(list(cmd)))
        except OSError:
            raise self._died() from None

    def _died(self) -> RuntimeError:
        self.proc.join(1)
        return RuntimeError(f"the {self.name} process died (exit code {self.proc.exitcode})")

    def recv(self, timeout_s: float | None = None):
        """The next reply's value; raise if the child failed, died or went quiet."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                raise self._died()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.name} process did not answer within {timeout_s:.3g} s")
        try:
            status, value = unpack(self.conn.recv_bytes())
        except (EOFError, OSError):
            raise self._died() from None
        if status != "ok":
            raise RuntimeError(f"the {self.name} process failed:\n{value}")
        return value

    def call(self, *cmd):
        """Send a command and return its reply."""
        self.send(*cmd)
        return self.recv()

    def stop(self) -> None:
        """Ask the child to clean up and exit; terminate it if it does not."""
        try:
            if self.proc.is_alive():
                self.call("stop")
        except (RuntimeError, TimeoutError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    """Best single-thread ``dst.copy_(src)`` bandwidth for ``nbytes`` (GB/s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.zeros_like(src)
        dst.copy_(src)                                      # warm-up: pages faulted in
        best = float("inf")
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return nbytes / best / 1e9


def _kv_once(rx: _Peer, tx: _Peer, rid: str, n: int, layerwise: bool) -> float:
    """One timed KV transfer of blocks ``0..n-1``."""
    rx.call("expect", rid, n, 1)
    secs = tx.call("send", rid, n, 1, layerwise)
    rx.call("finish", rid)
    return secs


def _raw_once(rx: _Peer, tx: _Peer, n: int, nbytes: int) -> float:
    """One timed raw pyzmq message: blocks ``0..n-1`` of every layer (receiver armed first)."""
    rx.send("raw_serve")
    rx.recv()                                               # "armed"
    secs = tx.call("raw_send", n)
    got = rx.recv()
    if got != nbytes:
        raise RuntimeError(f"raw pyzmq receiver got {got} bytes, expected {nbytes}")
    return secs


def _bench_transport(rx: _Peer, tx: _Peer, transport: str, geo: BenchGeometry, a,
                     tmp: str, memcpy: dict[int, float]) -> list[dict]:
    """Every size and mode over one transport; returns result rows."""
    is_zmq, rids = transport != "shm", itertools.count()
    sizes = [(t, geo.blocks_for(t)) for t in a.tokens]
    max_blocks = max(n for _, n in sizes)
    addr = "tcp://127.0.0.1:*" if transport == "zmq-tcp" else f"ipc://{tmp}/{transport}"
    endpoint = rx.call("setup", transport, asdict(geo), max_blocks, addr, a.timeout)
    tx.call("setup", transport, asdict(geo), max_blocks, a.seed, a.timeout)
    tx.call("connect", endpoint)
    if is_zmq:
        raw = ("tcp://127.0.0.1:*",) * 2 if transport == "zmq-tcp" else \
            (f"ipc://{tmp}/raw-data", f"ipc://{tmp}/raw-ack")
        tx.call("raw_connect", *rx.call("raw_bind", *raw))
    modes = ["whole"] + (["layerwise"] if a.layerwise else [])
    rows = []
    for tokens, n in sizes:
        nbytes, exact = n * geo.block_bytes, {}
        for mode in modes:                                  # warm-up, checked bit for bit
            rx.call("reset", n)
            _kv_once(rx, tx, f"{transport}-warm-{next(rids)}", n, mode == "layerwise")
            exact[mode] = rx.call("verify", a.seed, n)
        times: dict[str, list[float]] = {m: [] for m in modes + ["raw"]}
        if is_zmq:
            _raw_once(rx, tx, n, nbytes)
        for _ in range(a.repeats):
            if is_zmq:
                times["raw"].append(_raw_once(rx, tx, n, nbytes))
            for mode in modes:
                times[mode].append(_kv_once(rx, tx, f"{transport}-{next(rids)}", n, mode == "layerwise"))
        for mode in modes:
            row = {"tokens": tokens, "bytes": nbytes, "transport": transport, "mode": mode,
                   "gbps_best": nbytes / min(times[mode]) / 1e9,
                   "gbps_median": nbytes / statistics.median(times[mode]) / 1e9}
            if is_zmq:
                base, key, target = nbytes / min(times["raw"]) / 1e9, "raw", TARGETS["zmq_vs_raw"]
            else:
                base, key, target = memcpy[tokens], "memcpy", TARGETS["shm_vs_memcpy"]
            row.update({f"{key}_gbps": base, f"ratio_vs_{key}": row["gbps_best"] / base,
                        "meets_target": row["gbps_best"] / base >= target, "bit_exact": exact[mode]})
            rows.append(row)
            print(f"bench transfer: {transport:7s} {tokens:6d} tokens {mode:9s} "
                  f"{row['gbps_best']:6.2f} GB/s best {row['gbps_median']:6.2f} median | {key} "
                  f"{base:6.2f} GB/s, ratio {row[f'ratio_vs_{key}']:.2f} | bit_exact {exact[mode]}",
                  file=sys.stderr, flush=True)
    rx.call("teardown")                                     # unmap before the owner unlinks
    tx.call("teardown")
    return rows


def run_transfer_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark described in the module docstring; return a JSON-able dict."""
    geo = BenchGeometry(args.num_layers, args.num_kv_heads, args.block_size, args.head_dim, args.dtype)
    if not args.tokens or any(t <= 0 for t in args.tokens):
        raise ValueError(f"--tokens must be positive token counts, got {args.tokens}")
    if args.repeats < 1 or not args.timeout > 0:
        raise ValueError(f"--repeats must be >= 1 and --timeout > 0, got {args.repeats}, {args.timeout}")
    memcpy = {t: memcpy_gbps(geo.blocks_for(t) * geo.block_bytes, args.repeats) for t in args.tokens}
    ctx, rows, peers = mp.get_context("spawn"), [], []
    tmp = tempfile.mkdtemp(prefix="disagg-bench-")
    try:
        peers = [_Peer(ctx, "receiver", receiver_main, args.timeout),
                 _Peer(ctx, "sender", sender_main, args.timeout)]
        for transport in dict.fromkeys(args.transports):
            rows += _bench_transport(*peers, transport, geo, args, tmp, memcpy)
    finally:
        for peer in reversed(peers):
            peer.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"geometry": {**asdict(geo), "bytes_per_token": geo.block_bytes // geo.block_size},
            "memcpy_gbps": memcpy[max(args.tokens)], "targets": dict(TARGETS), "results": rows,
            "host": {"cpu_count": os.cpu_count(), "torch_threads_per_process": 1}}
