"""Start a node process: flags (with environment fall-backs), engine, loop, clean stop.

``disagg prefill-node`` and ``disagg decode-node`` (and ``python -m
prefill_node`` / ``python -m decode_node``) all land in :func:`run_node`;
only the role handler differs. Every address is a flag with an environment
variable behind it, so one launch script works on any machine::

    --router        DISAGG_ROUTER       the routers' control addresses (tcp://host:port[,...];
                                        a DNS name stands for every router it resolves to)
    --kv-transport  DISAGG_KV_TRANSPORT zmq (any hosts) | shm (same host) | cuda_ipc
    --kv-address    DISAGG_KV_ADDRESS   where decode ranks receive KV (tcp://host:* → free ports)
    --http-port     DISAGG_NODE_HTTP_PORT  /metrics, /readyz, /livez (unset: no HTTP server)
"""

from __future__ import annotations

import argparse
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
                   help="the router's control address, e.g. tcp://10.0.0.5:7100, or several "
                        "separated by commas; the node registers with each. A host that is a "
                        "DNS name stands for every address it resolves to (a Kubernetes "
                        "headless Service: every router replica) (env DISAGG_ROUTER)")
    p.add_argument("--router-resolve-s", type=float,
                   default=env("DISAGG_ROUTER_RESOLVE_S", "10"),
                   help="look router DNS names up again this often: new routers get a "
                        "registration, one gone from the answers for 2 minutes is forgotten "
                        "(env DISAGG_ROUTER_RESOLVE_S; default 10)")
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
    p.add_argument("--http-host", default=env("DISAGG_NODE_HTTP_HOST", "127.0.0.1"),
                   help="address of the node's HTTP server (0.0.0.0 in a pod, so the "
                        "kubelet's probes reach it) (env DISAGG_NODE_HTTP_HOST)")
    p.add_argument("--http-port", type=int, default=env("DISAGG_NODE_HTTP_PORT"),
                   help="serve GET /metrics (the engine's Prometheus metrics), /readyz (200 "
                        "once registered with a router and not draining) and /livez (200 "
                        "while the engine loop turns) on this port once the model is loaded; "
                        "0: a free port (printed). Unset: no HTTP server "
                        "(env DISAGG_NODE_HTTP_PORT)")
    p.add_argument("--live-stall-s", type=float, default=env("DISAGG_NODE_LIVE_STALL_S", "60"),
                   help="/livez fails once the engine loop has not turned for this long (one "
                        "CPU step can take seconds) (env DISAGG_NODE_LIVE_STALL_S; default 60)")
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
    from disagg.node.observability import LoopWatch, NodeHTTPServer, NodeMetrics
    from disagg.node.server import NodeServer
    from transport.base import TransportConfig

    from disagg.log_setup import configure_logging
    configure_logging(role, a.log_level)
    from disagg.node.router_links import parse_routers
    parse_routers(a.router)                 # a malformed address fails before the model loads
    if not a.router_resolve_s > 0:
        raise ValueError(f"--router-resolve-s must be > 0, got {a.router_resolve_s}")
    if a.http_port is not None and not 0 <= a.http_port <= 65535:
        raise ValueError(f"--http-port must be in 0..65535, got {a.http_port}")
    if not 0 < a.live_stall_s < float("inf"):
        raise ValueError(f"--live-stall-s must be > 0, got {a.live_stall_s}")
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
    metrics = NodeMetrics(role, node_id, num_kv_blocks=engine.num_blocks)
    watch = LoopWatch(a.live_stall_s)
    server = NodeServer(engine, handler_cls, a.router, node_id,
                        a.served_model_name or served_model_name(a.model), a.heartbeat_s,
                        a.drain_timeout_s, a.router_resolve_s, metrics, watch)
    http = None
    if a.http_port is not None:
        http = NodeHTTPServer(a.http_host, a.http_port, metrics.registry, server.ready,
                              watch.live).start()
    endpoints = engine.executor.kv_endpoints
    where = f", KV in at {', '.join(endpoints)}" if endpoints else ""
    served = f", HTTP on http://{a.http_host}:{http.port}" if http else ""
    print(f"[{node_id}] ready: {engine.num_blocks} KV blocks, router {a.router}{where}{served}",
          file=sys.stderr, flush=True)
    try:
        server.run(stop, drain)
    finally:
        if http is not None:
            http.close()
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
