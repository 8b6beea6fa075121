"""Fast failure detection on the KV path: a stopped, killed or unreachable receiver
fails the transfer within seconds (heartbeats, connect deadline), a busy one does not,
and the next transfer reconnects. Receivers run in real child processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import random_prompts
from transport.base import TransportConfig, TransportError, TransportTimeout
from transport.resharding import ReshardPlan
from transport.zmq_transport import ZmqKVReceiver, ZmqKVSender

L, N, H, B, D = 4, 256, 4, 16, 64         # 8 MiB of fp32 KV per layer for all 256 blocks
LIMIT_S = 3.0                             # the goal: a dead peer fails its transfer within this
CFG = TransportConfig(timeout_s=30, lease_s=60)   # defaults: connect 2 s, heartbeat 0.5 / 1.5 s


def source_pool(seed: int = 0) -> list[torch.Tensor]:
    """Deterministic per-layer prefill KV (all heads)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 2, H, B, D, generator=g) for _ in range(L)]


def _serve(address: str, conn) -> None:
    """Child process: a receiver that polls, except while told to be busy."""
    rx = ZmqKVReceiver(TransportConfig(address=address),
                       [torch.zeros(N, 2, H, B, D) for _ in range(L)])
    conn.send(rx.endpoint)
    while True:
        if conn.poll():
            cmd, *args = conn.recv()
            if cmd == "expect":
                rx.expect(*args)
                conn.send("ok")
            elif cmd == "busy":                   # the engine is in a long step: no polling
                conn.send("ok")
                time.sleep(args[0])
            elif cmd == "check":                  # dst blocks hold the source's src blocks?
                src, dst = args
                want = source_pool()
                conn.send(all(torch.equal(rx.kv_caches[i][dst], want[i][src]) for i in range(L)))
        rx.poll(0.01)


class Receiver:
    """A ZmqKVReceiver in a child process, driven over a pipe."""

    def __init__(self, address: str = "tcp://127.0.0.1:*") -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(address, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise RuntimeError("receiver process did not start")
        self.endpoint = self.conn.recv()

    def call(self, *cmd):
        """Send a command and return the child's answer."""
        self.conn.send(cmd)
        if not self.conn.poll(30):
            raise RuntimeError(f"receiver did not answer {cmd[0]}")
        return self.conn.recv()

    def signal(self, sig) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT, SIGKILL) to the child."""
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        """Kill the child (resumed first if stopped) and reap it."""
        if self.proc.is_alive():
            self.signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.join(10)


@pytest.fixture
def receivers():
    """A factory of :class:`Receiver` processes, all killed at the end of the test."""
    started: list[Receiver] = []

    def start(address: str = "tcp://127.0.0.1:*") -> Receiver:
        started.append(Receiver(address))
        return started[-1]
    yield start
    for rx in started:
        rx.close()


def make_sender(config: TransportConfig = CFG):
    """A sender of :func:`source_pool` (p = d = 1) and the release reasons it reports."""
    released: list[str] = []
    tx = ZmqKVSender(config, source_pool(), ReshardPlan(H, 1, 1),
                     on_release=lambda tid, blocks, why: released.append(why))
    return tx, released


def wait_finished(tx, timeout_s: float = 20.0) -> tuple[str | None, float]:
    """Poll like an engine does until one transfer ends; (its error, when it ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tx.poll(0.05)
        done = tx.finished()
        if done:
            ((_, _, error),) = done
            return error, time.monotonic()
    raise AssertionError(f"no transfer ended within {timeout_s} s")


def send_all(tx, rid, blocks, layers=(0, L), final=True, tid=None):
    """Send ``blocks`` to the same block ids on decode rank 0 (epoch 1)."""
    return tx.send(rid, 0, blocks, blocks, [1] * len(blocks), layers, transfer_id=tid, final=final)


def roundtrip(tx, rx: Receiver, rid: str, blocks: list[int]) -> None:
    """Reconnect if the link is down (as the engine does), send, and check it arrived intact."""
    if not tx.connected(0):
        tx.connect(0, rx.endpoint, wait=False)
    assert rx.call("expect", rid, blocks, [1] * len(blocks)) == "ok"
    send_all(tx, rid, blocks)
    error, _ = wait_finished(tx)
    assert error is None
    assert rx.call("check", blocks, blocks) is True


def test_receiver_stopped_mid_transfer_fails_fast_then_reconnects(receivers):
    rx = receivers()
    tx, released = make_sender()
    tx.connect(0, rx.endpoint)
    roundtrip(tx, rx, "warm", [0, 1])                           # the link is up and proven
    blocks = list(range(N))
    rx.call("expect", "big", blocks, [1] * N)
    tid = send_all(tx, "big", blocks, (0, 1), final=False)       # layer 0 goes through...
    deadline = time.monotonic() + 10
    while tx._transfers[tid].outstanding:                        # ...and is acknowledged
        assert time.monotonic() < deadline
        tx.poll(0.05)
    rx.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    send_all(tx, "big", blocks, (1, L), tid=tid)                 # 24 MiB more: stuck mid-frame
    error, t_end = wait_finished(tx)
    took = t_end - t_stop
    print(f"\nstopped receiver mid-transfer: failed {took:.2f} s after SIGSTOP")
    assert error and "heartbeat" in error
    assert took < LIMIT_S
    assert released[-1] == "error" and len(tx.pins) == 0
    assert not tx.connected(0)
    rx.signal(signal.SIGCONT)                                    # the peer comes back
    roundtrip(tx, rx, "again", [5, 6, 7])
    tx.close()


def test_receiver_killed_fails_fast_and_a_restarted_one_is_reached(receivers):
    rx = receivers()
    tx, released = make_sender()
    tx.connect(0, rx.endpoint)
    rx.call("expect", "r", [3, 4], [1, 1])
    assert rx.call("busy", 60) == "ok"                           # no ACK will come
    send_all(tx, "r", [3, 4])
    time.sleep(0.2)
    rx.signal(signal.SIGKILL)
    t_kill = time.monotonic()
    error, t_end = wait_finished(tx)
    print(f"\nkilled receiver: failed {t_end - t_kill:.2f} s after SIGKILL")
    assert error and "dropped" in error
    assert t_end - t_kill < LIMIT_S
    assert released == ["error"]
    rx.proc.join(10)
    again = receivers(rx.endpoint)                               # restarted on the same port
    assert again.endpoint == rx.endpoint
    roundtrip(tx, again, "r2", [8, 9, 10])
    tx.close()


def test_unanswered_connect_fails_within_connect_timeout(receivers):
    """A listening socket that never speaks ZeroMQ, and a stopped receiver process."""
    cfg = TransportConfig(timeout_s=30, connect_timeout_s=1.0)
    silent = socket.create_server(("127.0.0.1", 0))              # accepts TCP, never answers
    stopped = receivers()
    stopped.signal(signal.SIGSTOP)
    try:
        for endpoint in (f"tcp://127.0.0.1:{silent.getsockname()[1]}", stopped.endpoint):
            tx, released = make_sender(cfg)
            t0 = time.monotonic()
            with pytest.raises(TransportTimeout, match="no connection"):
                tx.connect(0, endpoint)                          # blocking HELLO
            took = time.monotonic() - t0
            print(f"\nunanswered HELLO to {endpoint}: failed after {took:.2f} s")
            assert cfg.connect_timeout_s <= took < cfg.connect_timeout_s + 1.0
            t0 = time.monotonic()
            tx.connect(0, endpoint, wait=False)                  # the engine's way: queue behind it
            send_all(tx, "q", [1])
            error, t_end = wait_finished(tx)
            assert error and "no connection" in error
            assert cfg.connect_timeout_s <= t_end - t0 < cfg.connect_timeout_s + 1.0
            assert released == ["error"]
            tx.close()
    finally:
        silent.close()


BLACKHOLED = "10.77.0.2"               # an address on lo inside a private network namespace
SLOW_RATE, SLOW_BLOCKS = "24mbit", 128    # 16 MiB at 3 MB/s: about 5.5 s on the wire


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _blackhole_scenario() -> None:
    """Run inside ``unshare -n`` as root: cut the path to the receiver with a blackhole
    rule (nothing is answered, no FIN or RST), then restore it; print the outcome as JSON."""
    _ip("link", "set", "lo", "up")
    _ip("addr", "add", f"{BLACKHOLED}/32", "dev", "lo")
    _ip("rule", "del", "pref", "0", "lookup", "local")        # let a rule come before `local`
    _ip("rule", "add", "pref", "100", "lookup", "local")
    out: dict = {}
    rx = Receiver(f"tcp://{BLACKHOLED}:*")
    try:
        tx, released = make_sender()
        roundtrip(tx, rx, "warm", [0, 1])
        blocks = list(range(N))
        rx.call("expect", "big", blocks, [1] * N)
        tid = send_all(tx, "big", blocks, (0, 1), final=False)
        while tx._transfers[tid].outstanding:
            tx.poll(0.05)
        _ip("rule", "add", "pref", "10", "to", BLACKHOLED, "blackhole")
        t_cut = time.monotonic()
        send_all(tx, "big", blocks, (1, L), tid=tid)
        out["mid_error"], t_end = wait_finished(tx)
        out["mid_s"] = t_end - t_cut
        t0 = time.monotonic()                                   # a new link while still cut
        tx.connect(0, rx.endpoint, wait=False)
        send_all(tx, "q", [1])
        out["new_error"], t_end = wait_finished(tx)
        out["new_s"] = t_end - t0
        _ip("rule", "del", "pref", "10")                        # the path comes back
        roundtrip(tx, rx, "back", [5, 6, 7])
        _ip("link", "set", "lo", "mtu", "1500")                 # packets within tbf's burst
        subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", SLOW_RATE,
                        "burst", "32kbit", "latency", "200ms"], check=True)
        t0 = time.monotonic()                                   # a slow link is not a dead one
        roundtrip(tx, rx, "slow", list(range(SLOW_BLOCKS)))
        out["slow_s"] = time.monotonic() - t0
        out["released"] = released
        tx.close()
    finally:
        rx.close()
    print(json.dumps(out))


def test_blackholed_link_fails_fast_slow_link_does_not():
    """A cut link, not a dead process: the receiver keeps running but nothing reaches it;
    restored, the link works again, and throttled to 3 MB/s a 16 MiB transfer (~5 s,
    far past the heartbeat timeout) completes: heartbeats do not queue behind KV frames."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("unshare", "ip", "tc")):
        pytest.skip("needs root, unshare, ip and tc (a private network namespace)")
    code = ("import sys; sys.path[:0] = sys.argv[1:]; "
            "import test_transport_liveness as t; t._blackhole_scenario()")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", code, here,
                          os.path.dirname(here)], capture_output=True, text=True, timeout=120)
    if res.returncode and "unshare failed" in res.stderr:
        pytest.skip(f"no private network namespace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nblackholed link: transfer failed {out['mid_s']:.2f} s after the cut; a new "
          f"link failed after {out['new_s']:.2f} s")
    assert out["mid_error"] and "heartbeat" in out["mid_error"]
    assert out["mid_s"] < LIMIT_S
    assert out["new_error"] and "no connection" in out["new_error"]
    assert out["new_s"] < CFG.connect_timeout_s + 1.0
    print(f"slow link ({SLOW_RATE}): a {SLOW_BLOCKS * L * 2 * H * B * D * 4 >> 20} MiB "
          f"transfer took {out['slow_s']:.1f} s and succeeded")
    assert out["slow_s"] > CFG.heartbeat_s + CFG.heartbeat_timeout_s
    assert out["released"] == ["acked", "error", "error", "acked", "acked"]


def test_busy_receiver_is_not_declared_dead(receivers):
    """Its engine does not poll for 4 s (longer than every liveness timeout), yet its
    ZeroMQ I/O thread answers: the HELLO and a 32 MiB transfer wait and then succeed."""
    rx = receivers()
    blocks = list(range(N))
    rx.call("expect", "slow", blocks, [1] * N)
    tx, released = make_sender()
    assert rx.call("busy", 4.0) == "ok"
    t0 = time.monotonic()
    tx.connect(0, rx.endpoint, wait=False)
    send_all(tx, "slow", blocks)
    error, t_end = wait_finished(tx)
    assert error is None and released == ["acked"]
    assert t_end - t0 > CFG.connect_timeout_s + CFG.heartbeat_s + CFG.heartbeat_timeout_s - 0.5
    assert rx.call("check", blocks, blocks) is True
    tx.close()


def test_config_and_flags_validate_liveness_timeouts():
    for kw in (dict(connect_timeout_s=0), dict(heartbeat_s=0), dict(heartbeat_timeout_s=-1),
               dict(heartbeat_s=1.0, heartbeat_timeout_s=1.0), dict(heartbeat_timeout_s=1e6),
               dict(connect_timeout_s="2")):
        with pytest.raises(ValueError):
            TransportConfig(**kw)
    cfg = TransportConfig(connect_timeout_s=0.5, heartbeat_s=0.2, heartbeat_timeout_s=0.6)
    assert (cfg.connect_timeout_s, cfg.heartbeat_s, cfg.heartbeat_timeout_s) == (0.5, 0.2, 0.6)

    import argparse

    from disagg.node.launch import add_node_args, main
    p = argparse.ArgumentParser()
    add_node_args(p, "prefill")
    a = p.parse_args(["--kv-connect-timeout-s", "1", "--kv-heartbeat-s", "0.25",
                      "--kv-heartbeat-timeout-s", "1"])
    assert (a.kv_connect_timeout_s, a.kv_heartbeat_s, a.kv_heartbeat_timeout_s) == (1.0, 0.25, 1.0)
    help_text = p.format_help()
    assert "--kv-heartbeat-timeout-s" in help_text and "--kv-connect-timeout-s" in help_text
    # the flags reach TransportConfig: a bad pair is refused before any model loads
    assert main("prefill", ["--router", "tcp://127.0.0.1:1", "--kv-heartbeat-s", "2",
                            "--kv-heartbeat-timeout-s", "1"]) == 2


# ---- the engine path: a prefill engine's KVSent event, decode engine in a child ----

PROMPT = random_prompts(1, 256, 21, 22, seed=4)[0]


def _decode_engine(model: str, conn) -> None:
    """Child process: a decode engine that hands out KV targets and keeps stepping."""
    from disagg.config import EngineConfig
    from disagg.engine import LLMEngine
    from disagg.engine.request import KVMode
    from disagg.sampling_params import SamplingParams
    de = LLMEngine(EngineConfig(model=model, role="decode", block_size=4, num_kv_blocks=64,
                                torch_threads=1, kv_transfer=TransportConfig()))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    conn.send("ready")
    while True:
        if conn.poll():
            conn.recv()
            rid = de.add_request(PROMPT, params, kv_mode=KVMode.LOAD_REMOTE)
            conn.send(next(o.kv_load for o in de.step() if o.request_id == rid).to_dict())
        if de.has_unfinished():
            de.step()
        else:
            time.sleep(0.01)


def test_prefill_engine_reports_a_stopped_decode_within_seconds(tiny_llama):
    """The issue's case: the link to a decode node was fine, then the node stops; the next
    transfer ends in KVSent(error) within seconds (it took the 30 s lease before)."""
    from disagg.config import EngineConfig
    from disagg.engine import LLMEngine
    from disagg.sampling_params import SamplingParams
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_engine, args=(tiny_llama, child), daemon=True)
    proc.start()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def target() -> dict:
        conn.send("target")
        assert conn.poll(60)
        return conn.recv()

    def prefill(pe, rid, kv_target) -> tuple[str | None, float]:
        pe.add_request(PROMPT, params, request_id=rid, kv_target=kv_target)
        deadline = time.monotonic() + 30
        while pe.has_unfinished():
            assert time.monotonic() < deadline
            pe.step()
        (event,) = pe.pop_kv_events()
        return event.error, time.monotonic()
    try:
        assert conn.poll(120) and conn.recv() == "ready"
        with LLMEngine(EngineConfig(model=tiny_llama, role="prefill", block_size=4,
                                    num_kv_blocks=64, torch_threads=1,
                                    kv_transfer=TransportConfig(timeout_s=30, lease_s=30))) as pe:
            assert prefill(pe, "p1", target())[0] is None        # a working, connected link
            second = target()
            os.kill(proc.pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            error, t_end = prefill(pe, "p2", second)
            print(f"\nprefill engine: KVSent(error) {t_end - t_stop:.2f} s after the decode stopped")
            assert error and "heartbeat" in error
            assert t_end - t_stop < LIMIT_S
            assert pe.scheduler.blocks.pool.num_free_blocks == 64
            worker = pe.executor.runner.connector
            sent = pe.kv_stats["bytes_sent"]
            assert worker.num_senders == 0 and sent > 0     # the dead link's sender is closed
            os.kill(proc.pid, signal.SIGCONT)
            assert prefill(pe, "p3", target())[0] is None        # reconnected
            assert worker.num_senders == 1 and pe.kv_stats["bytes_sent"] > sent
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.join(10)
