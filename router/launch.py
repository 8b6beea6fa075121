"""Start the router: flags (with environment fall-backs), then uvicorn on uvloop.

``disagg router`` (or ``python -m router``). Prints where it listens once it
does; ``--ready-file PATH`` also writes ``{"http": URL, "own_http": URL,
"control": ADDRESS}`` there (how ``disagg serve`` and the tests learn ports
chosen with ``0`` / ``*``).

Router workers: several router processes started with ``--reuse-port`` on the
same ``--port`` share that HTTP port (SO_REUSEPORT: the kernel hands each new
connection to one of them), each with its own control address, and every node
is given all of them (``--router A,B,...``) — the router replicas of
``README.md``, on one host. Each worker keeps its own node table and
calibration; ``--own-port`` gives it a second listener of its own
(``own_http``) through which its ``/health`` can be read. Started with
``PROMETHEUS_MULTIPROC_DIR`` naming one directory, empty before the first
starts, the workers' ``/metrics`` all serve the counters and histograms summed
over every worker (:class:`router.metrics.WorkersView`); without it each serves
its own.

SIGTERM / SIGINT drain the HTTP side: no new connections, requests in flight
(streams too) run to their end for up to ``--drain-timeout-s``, then the rest
are cancelled and it exits 0; the control plane keeps serving the nodes until
the last stream ended. A second SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path


def add_router_args(p: argparse.ArgumentParser) -> None:
    """The router's flags."""
    from router.migration import add_migration_args
    from router.policy import add_policy_arg
    env = os.environ.get
    p.add_argument("--host", default=env("DISAGG_HOST", "127.0.0.1"),
                   help="HTTP interface (env DISAGG_HOST; 0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=int(env("DISAGG_PORT", "8000")),
                   help="HTTP port, 0 = any free one (env DISAGG_PORT)")
    p.add_argument("--reuse-port", action="store_true",
                   help="bind --port with SO_REUSEPORT, so that several router processes "
                        "(workers) share it; the kernel spreads connections among them")
    p.add_argument("--own-port", type=int, default=None,
                   help="also listen on this port (0: a free one) for this process alone: "
                        "with --reuse-port, where this worker's /health and /metrics are read")
    p.add_argument("--control-address", default=env("DISAGG_CONTROL_ADDRESS", "tcp://127.0.0.1:*"),
                   help="where nodes connect: tcp://HOST:PORT, ':*' = a free port "
                        "(env DISAGG_CONTROL_ADDRESS)")
    p.add_argument("--uplink-port", type=int, default=int(env("DISAGG_UPLINK_PORT", "0")),
                   help="TCP port, on the control address's host, where registered nodes "
                        "open their uplink for what they send (tokens first): 0 = any free "
                        "one, -1 = none (nodes send everything on the control socket) "
                        "(env DISAGG_UPLINK_PORT)")
    p.add_argument("--model", default=env("DISAGG_MODEL", "default"),
                   help="the model whose tokenizer and chat template the router uses")
    p.add_argument("--served-model-name", default=env("DISAGG_SERVED_MODEL_NAME"),
                   help="the model name clients use (default: from --model)")
    add_policy_arg(p, default=env("DISAGG_POLICY", "cost"))
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, e.g. min_remote_tokens=512 (threshold) or "
                        "interference_weight=0.5 (cost); repeatable")
    p.add_argument("--api-key", default=env("DISAGG_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (env DISAGG_API_KEY)")
    p.add_argument("--max-inflight", type=int, default=int(env("DISAGG_MAX_INFLIGHT", "256")),
                   help="requests in flight before new ones get 429")
    p.add_argument("--node-timeout-s", type=float, default=3.0,
                   help="a node silent this long is dropped (its requests fall back)")
    add_migration_args(p)
    p.add_argument("--drain-timeout-s", type=float,
                   default=env("DISAGG_DRAIN_TIMEOUT_S", "30"),
                   help="on SIGTERM/SIGINT stop accepting connections and let requests in "
                        "flight finish for up to this long (env DISAGG_DRAIN_TIMEOUT_S; "
                        "default 30)")
    p.add_argument("--keep-alive-timeout-s", type=float,
                   default=env("DISAGG_KEEP_ALIVE_TIMEOUT_S", "75"),
                   help="close a client's idle keep-alive connection after this many seconds "
                        "(env DISAGG_KEEP_ALIVE_TIMEOUT_S; default 75, as nginx: longer than "
                        "the clients' and load balancers' own idle timeouts, so that they "
                        "close first; a server that closes first races the client's next "
                        "request on that connection, which then fails)")
    p.add_argument("--reject-ttft-slo-s", type=float, default=None, metavar="S",
                   help="refuse at once (429 + Retry-After) a request whose predicted time to "
                        "first token exceeds S seconds, counted in disagg_rejected_total"
                        "{reason=\"predicted_ttft\"}; nothing is refused until the cost model "
                        "has measured a few requests (default: off)")
    p.add_argument("--ready-file", default=None, help="write the bound addresses here as JSON")
    p.add_argument("--log-level", default=env("DISAGG_LOG_LEVEL", "INFO"))


def _policy_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-option must be KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``SO_REUSEPORT`` with ``reuse_port``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _server_class():
    """uvicorn's Server, minus re-raising the caught SIGTERM/SIGINT after shutting down
    (that would end the process with -15 instead of a clean exit 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            handlers = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
    return Server


async def serve_router(a: argparse.Namespace) -> None:
    """Run the router until cancelled or signalled."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from disagg.model.resolve import served_model_name
    from disagg.model.tokenizer import load_model_tokenizer
    from router.app import create_app
    from router.dispatch import Dispatcher
    from router.metrics import RouterMetrics, WorkersView, shared_metrics_dir
    from router.migration import MigrationConfig
    from router.nodes import NodeRegistry
    from router.policy import make_policy

    if a.uplink_port < -1:
        raise ValueError(f"--uplink-port must be a port, 0 (any free one) or -1 (none), "
                         f"got {a.uplink_port}")
    if not a.drain_timeout_s >= 0:
        raise ValueError(f"--drain-timeout-s must be >= 0, got {a.drain_timeout_s}")
    if not 0 < a.keep_alive_timeout_s < float("inf"):
        raise ValueError(f"--keep-alive-timeout-s must be seconds > 0, got "
                         f"{a.keep_alive_timeout_s}")
    if a.reject_ttft_slo_s is not None and not 0 < a.reject_ttft_slo_s < float("inf"):
        raise ValueError(f"--reject-ttft-slo-s must be a number of seconds > 0, got "
                         f"{a.reject_ttft_slo_s}")
    try:
        migration = MigrationConfig(a.max_migrations, a.migration_wait_s)
    except ValueError as exc:
        raise ValueError(f"--max-migrations / --migration-wait-s: {exc}") from None
    shared_dir = shared_metrics_dir()           # before the first metric exists
    name = a.served_model_name or served_model_name(a.model)
    tokenizer = load_model_tokenizer(a.model)      # no torch in this process
    policy = make_policy(a.policy, **_policy_options(a.policy_option))
    registry = CollectorRegistry()
    dispatcher = Dispatcher(NodeRegistry(name, a.node_timeout_s), policy,
                            RouterMetrics(registry), a.control_address, migration,
                            a.reject_ttft_slo_s,
                            None if a.uplink_port == -1 else a.uplink_port)
    exposed = registry if shared_dir is None else WorkersView(registry, shared_dir)
    app = create_app(dispatcher, exposed, tokenizer, name, a.api_key, a.max_inflight)
    server = _server_class()(uvicorn.Config(app, host=a.host, port=a.port, loop="none",
                                           log_level="warning", lifespan="on",
                                           timeout_keep_alive=a.keep_alive_timeout_s,
                                           timeout_graceful_shutdown=a.drain_timeout_s))
    sockets = None
    if a.reuse_port or a.own_port is not None:
        sockets = [_listener(a.host, a.port, a.reuse_port)]
        if a.own_port is not None:
            sockets.append(_listener(a.host, a.own_port, False))
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started:
        if task.done():
            await task                  # startup failed (port in use, ...): re-raise
            raise RuntimeError("the HTTP server stopped during start-up")
        await asyncio.sleep(0.02)
    http, own = (_url(srv.sockets[0]) for srv in (server.servers[0], server.servers[-1]))
    shared = " (port shared with other router workers; this one alone at " \
        f"{own})" if a.reuse_port else (f" and {own}" if own != http else "")
    print(f"router ready: {http}/v1{shared} (model {name}, policy {policy.name}); nodes "
          f"connect to {dispatcher.address}"
          + (f" (uplinks: port {dispatcher.uplink_port})" if dispatcher.uplink_port else ""),
          file=sys.stderr, flush=True)
    if a.ready_file:
        tmp = Path(a.ready_file + ".tmp")
        tmp.write_text(json.dumps({"http": http, "own_http": own,
                                   "control": dispatcher.address,
                                   "uplink_port": dispatcher.uplink_port}))
        tmp.replace(a.ready_file)
    await task


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_router(a: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and shuts down cleanly)."""
    import uvloop
    from disagg.log_setup import configure_logging
    configure_logging("router", a.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_router(a))
    print("router stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m router``."""
    p = argparse.ArgumentParser(prog="router", description="The disagg router.")
    add_router_args(p)
    try:
        return run_router(p.parse_args(argv))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        return 2
