"""Start a node process: flags (with environment fall-backs), engine, loop, clean stop.

``disagg prefill-node`` and ``disagg decode-node`` (and ``python -m
prefill_node`` / ``python -m decode_node``) all land in :func:`run_node`;
only the role handler differs. Every address is a flag with an environment
variable behind it, so one launch script works on any machine::

    --router        DISAGG_ROUTER       the router's control address (tcp://host:port)
    --kv-transport  DISAGG_KV_TRANSPORT zmq (any hosts) | shm (same host) | cuda_ipc
    --kv-address    DISAGG_KV_ADDRESS   where decode ranks receive KV (tcp://host:* → free ports)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from disagg.engine_args import add_engine_args, add_kv_transport_arg, engine_config_from_args
from disagg.model.resolve import served_model_name


def add_node_args(p: argparse.ArgumentParser, role: str) -> None:
    """Flags of a node of ``role`` (engine flags included)."""
    env = os.environ.get
    p.add_argument("--router", default=env("DISAGG_ROUTER"),
                   help="the router's control address, e.g. tcp://10.0.0.5:7100 "
                        "(env DISAGG_ROUTER)")
    p.add_argument("--node-id", default=env("DISAGG_NODE_ID"),
                   help=f"unique name (default {role}-HOST-PID; env DISAGG_NODE_ID)")
    p.add_argument("--served-model-name", default=env("DISAGG_SERVED_MODEL_NAME"),
                   help="the model name clients use (default: from --model)")
    add_kv_transport_arg(p, default=env("DISAGG_KV_TRANSPORT", "zmq"),
                         note="zmq: any two hosts; shm / cuda_ipc: prefill and decode on one "
                              "host (env DISAGG_KV_TRANSPORT)")
    p.add_argument("--kv-address", default=env("DISAGG_KV_ADDRESS", "tcp://127.0.0.1:*"),
                   help="where this node's ranks receive KV: tcp://HOST:* (free ports), "
                        "tcp://HOST:PORT (rank r uses PORT+r) or ipc://* (env DISAGG_KV_ADDRESS)")
    p.add_argument("--no-layerwise", action="store_true",
                   help="send KV after the whole forward instead of layer by layer")
    p.add_argument("--kv-load-timeout-s", type=float, default=30.0,
                   help="decode: prefill locally if remote KV has not arrived by then")
    p.add_argument("--kv-connect-timeout-s", type=float, default=2.0,
                   help="prefill: a KV link whose receiver has not completed the ZeroMQ "
                        "handshake by then fails its transfers (default 2)")
    p.add_argument("--kv-heartbeat-s", type=float, default=0.5,
                   help="prefill: ping each decode rank's KV receiver this often (default 0.5)")
    p.add_argument("--kv-heartbeat-timeout-s", type=float, default=1.5,
                   help="prefill: a KV link whose pings go unanswered this long (receiver "
                        "stopped or gone, link cut) fails its transfers; a busy receiver still "
                        "answers. Must exceed --kv-heartbeat-s (default 1.5: detection <= 2 s)")
    p.add_argument("--cpus", default=env("DISAGG_CPUS"),
                   help="pin this node (and its TP ranks) to these cores, e.g. 0-3,8 "
                        "(env DISAGG_CPUS; default: no pinning)")
    p.add_argument("--nice", type=int, default=env("DISAGG_NODE_NICE", "0"),
                   help="raise this node's nice value by N (0-19) at start, so a router on "
                        "the same cores gets the CPU first (env DISAGG_NODE_NICE; default 0)")
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--drain-timeout-s", type=float,
                   default=env("DISAGG_DRAIN_TIMEOUT_S", "30"),
                   help="on the first SIGTERM/SIGINT the node takes no new requests and "
                        "finishes the ones it holds for up to this long, then leaves; a "
                        "second signal stops it at once (env DISAGG_DRAIN_TIMEOUT_S; default 30)")
    p.add_argument("--log-level", default=env("DISAGG_LOG_LEVEL", "INFO"))
    add_engine_args(p)


def run_node(a: argparse.Namespace, role: str) -> int:
    """Serve as a ``role`` node until SIGINT/SIGTERM; returns the exit code."""
    from disagg.engine import LLMEngine
    from disagg.node.server import NodeServer
    from transport.base import TransportConfig

    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {role} %(levelname)s %(message)s")
    if not a.router:
        raise ValueError("no router address: pass --router tcp://HOST:PORT or set DISAGG_ROUTER")
    if not a.router.startswith(("tcp://", "ipc://")):
        raise ValueError(f"--router must be a tcp:// or ipc:// address, got {a.router!r}")
    if not 0 <= a.nice <= 19:
        raise ValueError(f"--nice must be in 0..19, got {a.nice}")
    if not a.drain_timeout_s >= 0:
        raise ValueError(f"--drain-timeout-s must be >= 0, got {a.drain_timeout_s}")
    if a.nice:          # before any thread (torch's, ZeroMQ's) or TP rank exists: all inherit it
        os.nice(a.nice)
    if role == "decode":
        from decode_node.handler import DecodeHandler as handler_cls
    else:
        from prefill_node.handler import PrefillHandler as handler_cls
    if a.cpus:
        from disagg.cpus import pin_to_cpus
        pin_to_cpus(a.cpus)
    node_id = a.node_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    transport = TransportConfig(kind=a.kv_transport, address=a.kv_address,
                                connect_timeout_s=a.kv_connect_timeout_s,
                                heartbeat_s=a.kv_heartbeat_s,
                                heartbeat_timeout_s=a.kv_heartbeat_timeout_s)
    config = engine_config_from_args(a, role=role, kv_transfer=transport,
                                     kv_layerwise=not a.no_layerwise,
                                     kv_load_timeout_s=a.kv_load_timeout_s)
    stop, drain = threading.Event(), threading.Event()

    def on_signal(*_) -> None:          # the first drains, a second stops at once
        (stop if drain.is_set() else drain).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"[{node_id}] loading {a.model} (TP {config.tensor_parallel_size}, {role})...",
          file=sys.stderr, flush=True)
    engine = LLMEngine(config)
    server = NodeServer(engine, handler_cls, a.router, node_id,
                        a.served_model_name or served_model_name(a.model), a.heartbeat_s,
                        a.drain_timeout_s)
    where = f", KV in at {', '.join(engine.kv_endpoints)}" if engine.kv_endpoints else ""
    print(f"[{node_id}] ready: {engine.num_blocks} KV blocks, router {a.router}{where}",
          file=sys.stderr, flush=True)
    try:
        server.run(stop, drain)
    finally:
        server.close()
        print(f"[{node_id}] stopped", file=sys.stderr, flush=True)
    return 0


def main(role: str, argv: list[str] | None = None) -> int:
    """``python -m prefill_node`` / ``python -m decode_node``."""
    p = argparse.ArgumentParser(prog=f"{role}_node", description=f"A {role} node.")
    add_node_args(p, role)
    try:
        return run_node(p.parse_args(argv), role)
    except (ValueError, RuntimeError) as exc:
        print(f"{role}_node: error: {exc}", file=sys.stderr)
        return 2
