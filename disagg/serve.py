"""``disagg serve``: a router, one prefill node and one decode node on this machine.

The one-command deployment: it starts the three processes through
:class:`~disagg.cluster.LocalCluster` (their output goes to this terminal),
prints one ready line with the OpenAI base URL (:data:`READY_LINE`; with several
router workers, the line listing each one's own address comes just before it),
then supervises them:

- a node exits on its own: say which one and its exit code, and start it again
  under the same name (node id) after a back-off (:class:`RestartBackoff`: 1 s,
  doubling up to 30 s, back to 1 s once a run lasted a minute). The router
  counts it (``disagg_node_restarts_total``) and keeps answering meanwhile:
  without the prefill node prompts are prefilled on the decode node, without
  the decode node new requests get 503 with ``Retry-After``.
- the router exits on its own: say so, stop the nodes, exit 1.
- SIGINT (Ctrl-C) or SIGTERM: stop every child (SIGTERM: nodes drain, the
  router finishes its streams; whatever is still up ``--drain-timeout-s`` + 10 s
  later is killed),
  print ``stopped``, exit 0. A terminal's Ctrl-C reaches the children too
  (same process group) and they stop themselves; once shutdown began, their
  exits are expected.
- start-up fails: say why, stop whatever started, exit 2.

Layout (:func:`disagg.layout.plan_layout`, printed at start-up, one line per
process): the router is never pinned; the nodes split the usable cores, or
share them all on a machine too small to split (the rule is in
``disagg.layout``). ``--prefill-cpus`` / ``--decode-cpus`` override the rule (a
core list, or ``all`` = not pinned).

Multi-machine deployments start the roles one by one instead
(``scripts/launch_router.sh``, ``launch_prefill.sh``, ``launch_decode.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from disagg.cluster import ClusterConfig, LocalCluster
from disagg.cpus import usable_cpus
from disagg.engine_args import add_dtype_arg, add_kv_transport_arg
from disagg.layout import Layout, plan_layout
from router.migration import add_migration_args
from router.policy import add_policy_arg

# Engine flags ``disagg serve`` forwards to both nodes: (attribute, node flag).
NODE_FLAGS = (("kv_cache_memory", "--kv-cache-memory"), ("max_num_seqs", "--max-num-seqs"),
              ("dtype", "--dtype"), ("device", "--device"))


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``disagg serve``."""
    env = os.environ.get
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a local HF directory, or a hub id")
    p.add_argument("--host", default=env("DISAGG_HOST", "127.0.0.1"),
                   help="HTTP interface (env DISAGG_HOST; 0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=env("DISAGG_PORT", "8000"),
                   help="HTTP port, 0 = any free one (env DISAGG_PORT)")
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel degree of the prefill node")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel degree of the decode node")
    add_policy_arg(p)
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, e.g. min_remote_tokens=512 (threshold); repeatable")
    add_kv_transport_arg(p, default="shm", note="shm (default): shared memory, this host; "
                         "cuda_ipc: GPUs of this host; zmq: sockets")
    p.add_argument("--api-key", default=env("DISAGG_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (env DISAGG_API_KEY)")
    p.add_argument("--max-inflight", type=int, default=256,
                   help="requests in flight before new ones get 429 (per router worker)")
    p.add_argument("--reject-ttft-slo-s", type=float, default=None, metavar="S",
                   help="refuse at once (429) requests whose predicted time to first token "
                        "exceeds S seconds, once the cost model has measured a few (default: off)")
    p.add_argument("--router-workers", type=int, default=1,
                   help="router processes sharing the HTTP port (SO_REUSEPORT), each with its "
                        "own node table and calibration; /metrics counts every worker's "
                        "requests; more than one spreads the per-stream work of many "
                        "concurrent streams over cores (default 1)")
    p.add_argument("--startup-timeout-s", type=float, default=180.0,
                   help="give up if the nodes have not registered by then")
    g = p.add_argument_group("faults")
    g.add_argument("--node-timeout-s", type=float, default=3.0,
                   help="the router drops a node silent this long (its requests move on)")
    add_migration_args(g)
    g.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long the router and the nodes let requests in flight "
                        "finish (disagg serve's own stop waits for them)")
    g = p.add_argument_group("process layout (default: split the cores between the nodes "
                             "when each gets >= 2 per TP rank, else share them all)")
    g.add_argument("--prefill-cpus", default=None, metavar="CPUS",
                   help="cores of the prefill node, e.g. 0-3 ('all' = not pinned; "
                        "default: the layout rule, or the cores --decode-cpus leaves)")
    g.add_argument("--decode-cpus", default=None, metavar="CPUS",
                   help="cores of the decode node, e.g. 4-7 ('all' = not pinned; "
                        "default: the layout rule, or the cores --prefill-cpus leaves)")
    g = p.add_argument_group("engine flags passed to both nodes")
    g.add_argument("--kv-cache-memory", default=None, help="KV cache budget per rank, e.g. 512MiB")
    g.add_argument("--max-num-seqs", type=int, default=None)
    add_dtype_arg(g, default=None)
    g.add_argument("--device", default=None, help="cpu or cuda[:N]")


def cluster_config_from_args(a: argparse.Namespace, layout: Layout | None = None) -> ClusterConfig:
    """The :class:`ClusterConfig` for parsed ``add_serve_args`` flags and the nodes'
    core ``layout`` (default: no pinning); ``ValueError`` if bad."""
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {a.port}")
    if a.router_workers < 1:
        raise ValueError(f"--router-workers must be >= 1, got {a.router_workers}")
    if a.reject_ttft_slo_s is not None and not 0 < a.reject_ttft_slo_s < float("inf"):
        raise ValueError(f"--reject-ttft-slo-s must be a number of seconds > 0, got "
                         f"{a.reject_ttft_slo_s}")
    from router.migration import MigrationConfig
    MigrationConfig(a.max_migrations, a.migration_wait_s)          # ValueError if bad
    if not 0 <= a.drain_timeout_s < float("inf"):
        raise ValueError(f"--drain-timeout-s must be a number of seconds >= 0, got "
                         f"{a.drain_timeout_s}")
    node_args: list[str] = ["--drain-timeout-s", repr(a.drain_timeout_s)]
    for attr, flag in NODE_FLAGS:
        value = getattr(a, attr)
        if value is not None:
            node_args += [flag, str(value)]
    router_args = ("--max-migrations", str(a.max_migrations), "--migration-wait-s",
                   repr(a.migration_wait_s), "--drain-timeout-s", repr(a.drain_timeout_s))
    layout = layout or Layout((), None, None)
    return ClusterConfig(model=a.model, prefill_tp=a.prefill_tp, decode_tp=a.decode_tp,
                         policy=a.policy, policy_options=tuple(a.policy_option),
                         kv_transport=a.kv_transport, host=a.host, port=a.port,
                         api_key=a.api_key, max_inflight=a.max_inflight,
                         reject_ttft_slo_s=a.reject_ttft_slo_s, node_timeout_s=a.node_timeout_s,
                         router_args=router_args, node_args=tuple(node_args), prefill_args=layout.node_args("prefill"),
                         decode_args=layout.node_args("decode"), log_dir=None,
                         startup_timeout_s=a.startup_timeout_s,
                         router_workers=a.router_workers,
                         compute_turns=bool(layout.shared()) and not _on_cuda(a))


def _on_cuda(a: argparse.Namespace) -> bool:
    """Whether the nodes compute on GPUs (the cores then only feed them: no turns)."""
    return (a.device or "").startswith("cuda")


def _say(msg: str) -> None:
    print(f"disagg serve: {msg}", file=sys.stderr, flush=True)


class _Interrupted(Exception):
    """A stop signal arrived while the cluster was still starting."""


class _ServeCluster(LocalCluster):
    """A :class:`LocalCluster` that announces each node as it starts it."""

    def start_node(self, role: str, tp: int, wait: bool = True) -> str:
        """Print what is starting, then start it (see ``LocalCluster.start_node``)."""
        _say(f"starting {role} node (TP {tp})...")
        return super().start_node(role, tp, wait)


READY_LINE = "disagg serve ready: "
"""Start of the ready output's line: the OpenAI base URL follows; everything printed
about the deployment's addresses comes before it."""

WORKERS_LINE = "router workers share the port, and /metrics counts them all; each one alone: "
"""Start of the ready output's line that lists each router worker's own address, where
its ``/health`` (its node table) is read (only with ``--router-workers`` > 1): ``N`` +
this + ``NAME (pid P) URL, ...``."""


def curl_example(base_url: str, model: str, api_key: bool) -> str:
    """A ready-to-paste chat request against ``base_url`` (``.../v1``)."""
    body = json.dumps({"model": model, "max_tokens": 32, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]})
    auth = " -H 'Authorization: Bearer <your API key>'" if api_key else ""
    return (f"curl {base_url}/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{body}'")


class RestartBackoff:
    """How long to wait before restarting a node that died: ``first_s``, doubling on
    each death up to ``max_s``, back to ``first_s`` once a run lasted ``stable_s``."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0,
                 stable_s: float = 60.0) -> None:
        if not 0 < first_s <= max_s or stable_s <= 0:
            raise ValueError(f"need 0 < first_s <= max_s and stable_s > 0, got first_s "
                             f"{first_s!r}, max_s {max_s!r}, stable_s {stable_s!r}")
        self.first_s, self.max_s, self.stable_s = first_s, max_s, stable_s
        self._next: dict[str, float] = {}

    def delay(self, name: str, uptime_s: float) -> float:
        """The wait before restarting ``name``, whose last run lasted ``uptime_s``."""
        delay = self.first_s if uptime_s >= self.stable_s else self._next.get(name, self.first_s)
        self._next[name] = min(delay * 2, self.max_s)
        return delay


def _supervise(cluster: LocalCluster, stop: threading.Event,
               backoff: RestartBackoff | None = None) -> int:
    """Restart dead nodes (after ``backoff``) until a stop signal (→ 0) or the router
    exiting on its own (→ 1)."""
    backoff = backoff or RestartBackoff()
    started = {name: time.monotonic() for name in cluster.procs}
    due: dict[str, float] = {}                  # node name → when to restart it
    routers = set(cluster.router_names())
    while not stop.wait(0.2):
        dead = [(n, p) for n, p in cluster.procs.items()
                if n not in due and p.poll() is not None]
        if dead and stop.wait(0.5):    # a terminal Ctrl-C reaches the children first, sometimes
            return 0
        for name, proc in dead:
            if name in routers:
                _say(f"{name} (pid {proc.pid}) exited unexpectedly with code "
                     f"{proc.returncode}; stopping the nodes")
                return 1
        now = time.monotonic()
        for name, proc in dead:
            up = now - started[name]
            delay = backoff.delay(name, up)
            due[name] = now + delay
            _say(f"{name} (pid {proc.pid}) exited unexpectedly with code {proc.returncode} "
                 f"after {up:.0f} s; restarting it in {delay:g} s")
        for name in [n for n, at in due.items() if at <= time.monotonic()]:
            del due[name]
            cluster.restart_node(name, wait=False)
            started[name] = time.monotonic()
            _say(f"{name} restarted (pid {cluster.procs[name].pid})")
    return 0


def run_serve(a: argparse.Namespace) -> int:
    """Start, announce, supervise and stop the local deployment; return the exit code."""
    from disagg.model.resolve import served_model_name
    try:
        layout = plan_layout(usable_cpus(), a.prefill_tp, a.decode_tp, a.prefill_cpus,
                             a.decode_cpus)
        config = cluster_config_from_args(a, layout)
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    _say(f"layout on {len(layout.usable)} usable cores:")
    for line in layout.describe(turns=config.compute_turns):
        _say(f"  {line}")
    if _on_cuda(a):
        _say(f"  both nodes compute on {a.device} (a TP > 1 node on cuda:0..TP-1): where their "
             "GPUs overlap they share them, and report so to the router's cost model")
    cluster = _ServeCluster(config)
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame) -> None:
        stop.set()
        if starting:
            raise _Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 2
    try:
        t0 = time.monotonic()
        _say(f"starting router on {config.host}:{config.port} (model {config.model}, "
             f"policy {config.policy}, KV over {config.kv_transport})...")
        cluster.start()
        starting = False
        procs = cluster.procs
        base = f"{cluster.http_url}/v1"
        name = served_model_name(config.model)
        _say(f"all nodes registered in {time.monotonic() - t0:.1f} s")
        if config.router_workers > 1:         # addresses come before the ready line
            own = ", ".join(f"{n} (pid {procs[n].pid}) {url}"
                            for n, url in zip(cluster.router_names(), cluster.router_urls))
            print(f"  {config.router_workers} {WORKERS_LINE}{own}", file=sys.stderr,
                  flush=True)
        print(f"{READY_LINE}{base}  (model {name}; router pid {procs['router'].pid}, "
              f"prefill pid {procs['prefill-0'].pid}, decode pid {procs['decode-0'].pid})",
              file=sys.stderr, flush=True)
        print(f"  try: {curl_example(base, name, bool(config.api_key))}", file=sys.stderr, flush=True)
        print("  Ctrl-C stops all three; a node that dies is started again.", file=sys.stderr,
              flush=True)
        code = _supervise(cluster, stop)
    except _Interrupted:
        code = 0
    except (RuntimeError, ValueError, OSError) as exc:
        _say(f"error: start-up failed: {exc}")
        code = 2
    finally:
        starting = False
        if stop.is_set() and code == 0:
            _say("stopping...")
        cluster.stop(timeout_s=a.drain_timeout_s + 10)
        for s, handler in old.items():
            signal.signal(s, handler)
    if code == 0:
        _say("stopped")
    return code
