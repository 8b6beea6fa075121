"""A router and its nodes as child processes on this machine.

``disagg serve``, the HTTP tests and the router benchmark all start their
deployments through :class:`LocalCluster`::

    with LocalCluster(ClusterConfig(prefill_tp=3, policy="remote")) as c:
        c.start()                      # router, then nodes; waits until all registered
        httpx.post(c.http_url + "/v1/completions", json=...)
        c.kill("prefill-0")            # SIGKILL one node (fault tests)
        c.start_node("prefill", tp=1)  # and bring up another
        c.restart_node("prefill-0")    # or the same one again (same name and node id)
        c.kill("router"); c.restart_router()   # a new router on the same control address
                                               # (restart_router(1): worker router-1)

With ``router_workers`` > 1 the router is that many processes sharing the HTTP
port (``router --reuse-port``; named ``router``, ``router-1``, ...), each with
its own control address, and every node is given all of them; ``http_url`` is
the shared port, ``router_urls`` each worker's own listener (its ``/health``).
The workers share a fresh metrics directory in the cluster's temporary
directory (``PROMETHEUS_MULTIPROC_DIR``), so ``/metrics`` at any of their
addresses counts every worker's requests; a single router, and every node, is
started without that variable, whatever the environment says.

Each child's output goes to ``log_dir/NAME.log`` (or is inherited when
``log_dir`` is None, as ``disagg serve`` does). Ports are chosen by the OS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from router.metrics import MULTIPROC_DIR_ENV
from transport.base import KINDS


@dataclass(frozen=True)
class ClusterConfig:
    """What to start. ``node_args`` are extra flags for every node (engine flags);
    ``prefill_args`` / ``decode_args`` go to that role's nodes only (after
    ``node_args``, so they win), e.g. ``("--cpus", "0", "--torch-threads", "1")``;
    ``router_args`` are extra router flags, e.g. ``("--drain-timeout-s", "60")``.

    ``node_nice``: nodes start with this nice value (``--nice``), the router with 0,
    so on shared cores the router's few milliseconds of work per engine step preempt
    the nodes' torch threads instead of queueing behind them. Measured with
    ``disagg bench router`` on 2 cores (benchmarks.md, "Router overhead"): nice 10
    cut the router-only overhead p50 from 3.3 to 1.8 ms at 1 stream and from 9.8 to
    8.1 ms at 32, tokens/s unchanged (the nodes still get every idle cycle).

    ``reject_ttft_slo_s``: the router's ``--reject-ttft-slo-s`` (None: off).

    ``compute_turns``: the nodes share cores, so they take turns at compute
    (``--compute-turns``, a lock in this cluster's temporary directory; see
    :mod:`disagg.engine.compute_turns`).

    ``router_workers``: router processes sharing the HTTP port (see the module
    docstring); more than one spreads the router's per-stream work over cores."""

    model: str = "default"
    prefill_tp: int = 1
    decode_tp: int = 1
    num_prefill: int = 1
    num_decode: int = 1
    policy: str = "cost"
    policy_options: tuple[str, ...] = ()          # KEY=VALUE
    kv_transport: str = "zmq"
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    max_inflight: int = 256
    reject_ttft_slo_s: float | None = None
    node_timeout_s: float = 3.0
    node_nice: int = 10
    node_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    log_dir: str | None = None
    startup_timeout_s: float = 180.0
    compute_turns: bool = False
    router_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("prefill_tp", "decode_tp", "num_decode", "max_inflight", "router_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.num_prefill, int) or self.num_prefill < 0:
            raise ValueError(f"num_prefill must be an int >= 0, got {self.num_prefill!r}")
        if self.kv_transport not in KINDS:
            raise ValueError(f"kv_transport must be one of {KINDS}, got {self.kv_transport!r}")
        if not isinstance(self.node_nice, int) or not 0 <= self.node_nice <= 19:
            raise ValueError(f"node_nice must be an int in 0..19, got {self.node_nice!r}")
        if self.startup_timeout_s <= 0 or self.node_timeout_s <= 0:
            raise ValueError("startup_timeout_s and node_timeout_s must be > 0")
        if self.reject_ttft_slo_s is not None and not 0 < self.reject_ttft_slo_s < float("inf"):
            raise ValueError(f"reject_ttft_slo_s must be None or seconds > 0, got "
                             f"{self.reject_ttft_slo_s!r}")


@dataclass
class LocalCluster:
    """Router + nodes as subprocesses (see the module docstring)."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    procs: dict = field(default_factory=dict)       # name → subprocess.Popen
    http_url: str = ""                              # the (shared) HTTP port
    router_urls: list = field(default_factory=list)       # each worker's own HTTP listener
    router_controls: list = field(default_factory=list)   # each worker's control address
    router_uplink_ports: list = field(default_factory=list)   # each worker's uplink port
    _counts: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    _nodes: dict = field(default_factory=dict)      # node name → (role, tp)
    _tmp: tempfile.TemporaryDirectory | None = None

    def _spawn(self, name: str, args: list[str], env: dict[str, str | None] | None = None
               ) -> subprocess.Popen:
        """Start ``python -m ARGS`` as ``name``; ``env`` adds to (None: removes from)
        this process's environment."""
        out = None
        if self.config.log_dir is not None:
            Path(self.config.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.config.log_dir) / f"{name}.log", "ab")
        env = {k: v for k, v in dict(os.environ, PYTHONUNBUFFERED="1",
                                     TOKENIZERS_PARALLELISM="false", **(env or {})).items()
               if v is not None}
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out,
                                stderr=subprocess.STDOUT if out else None, env=env)
        if out is not None:
            out.close()
        self.procs[name] = proc
        return proc

    def start(self) -> "LocalCluster":
        """Start the router and the configured nodes; return once every node registered."""
        c = self.config
        self._tmp = tempfile.TemporaryDirectory(prefix="disagg-cluster-")
        deadline = time.monotonic() + c.startup_timeout_s
        port = c.port
        for i in range(c.router_workers):
            info = self._start_router(i, f"tcp://{c.host}:*", port, deadline)
            self.http_url = info["http"]
            port = self._http_port()              # the first's, shared by the others
            self.router_urls.append(info["own_http"])
            self.router_controls.append(info["control"])
            self.router_uplink_ports.append(info["uplink_port"])
        for _ in range(c.num_prefill):
            self.start_node("prefill", c.prefill_tp, wait=False)
        for _ in range(c.num_decode):
            self.start_node("decode", c.decode_tp, wait=False)
        self.wait_nodes(c.num_prefill, c.num_decode, deadline)
        return self

    @property
    def control_address(self) -> str:
        """The first router worker's control address."""
        return self.router_controls[0]

    @staticmethod
    def router_name(worker: int) -> str:
        """The process name of router worker ``worker`` (``router`` for the first)."""
        return "router" if worker == 0 else f"router-{worker}"

    def router_names(self) -> list[str]:
        """The process names of every router worker, first to last."""
        return [self.router_name(i) for i in range(self.config.router_workers)]

    def router_pids(self) -> list[int]:
        """The process ids of every router worker, first to last."""
        return [self.procs[name].pid for name in self.router_names()]

    def _http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    def _start_router(self, worker: int, control_address: str, port: int,
                      deadline: float) -> dict:
        """Spawn router worker ``worker`` on ``control_address`` and HTTP ``port``; wait for
        its ready file and return it (``http``, ``own_http``, ``control``, ``uplink_port``)."""
        c = self.config
        name = self.router_name(worker)
        ready = Path(self._tmp.name) / f"{name}-{time.monotonic_ns()}.json"
        args = ["router", "--host", c.host, "--port", str(port), "--model", c.model,
                "--control-address", control_address, "--policy", c.policy,
                "--max-inflight", str(c.max_inflight), "--node-timeout-s", str(c.node_timeout_s),
                "--ready-file", str(ready)]
        metrics_dir = None                    # one router: its own registry
        if c.router_workers > 1:
            args += ["--reuse-port", "--own-port", "0"]
            shared = Path(self._tmp.name) / "router-metrics"
            shared.mkdir(exist_ok=True)           # empty until the first worker counts
            metrics_dir = str(shared)
        for opt in c.policy_options:
            args += ["--policy-option", opt]
        if c.api_key:
            args += ["--api-key", c.api_key]
        if c.reject_ttft_slo_s is not None:
            args += ["--reject-ttft-slo-s", repr(c.reject_ttft_slo_s)]
        args += list(c.router_args)
        router = self._spawn(name, args, {MULTIPROC_DIR_ENV: metrics_dir})
        while not ready.exists():
            self._check_alive(router, name, deadline)
            time.sleep(0.05)
        return json.loads(ready.read_text())

    def restart_router(self, worker: int = 0, wait_nodes: bool = True) -> None:
        """Start router worker ``worker`` (default the first, ``router``) again on the
        addresses of the old process (the control address the nodes were given, the
        shared HTTP port; a new own port, in ``router_urls``), after it exited
        (``RuntimeError`` if it still runs, ``ValueError`` for no such worker). With
        ``wait_nodes``, return once every node still running registered with it again
        (they do so by themselves)."""
        if not 0 <= worker < len(self.router_controls):
            raise ValueError(f"no router worker {worker}: the cluster has "
                             f"{len(self.router_controls)}")
        name = self.router_name(worker)
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running; kill or stop it first")
        deadline = time.monotonic() + self.config.startup_timeout_s
        info = self._start_router(worker, self.router_controls[worker], self._http_port(),
                                  deadline)
        self.router_urls[worker] = info["own_http"]
        self.router_uplink_ports[worker] = info["uplink_port"]
        if wait_nodes:
            alive = [r for n, (r, _) in self._nodes.items()
                     if n in self.procs and self.procs[n].poll() is None]
            self.wait_nodes(alive.count("prefill"), alive.count("decode"), deadline)

    def start_node(self, role: str, tp: int, wait: bool = True) -> str:
        """Start one more ``role`` node (named ``role-N``); return its name."""
        name = f"{role}-{self._counts[role]}"
        self._counts[role] += 1
        self._nodes[name] = (role, tp)
        self._spawn_node(name, wait)
        return name

    @property
    def turns_path(self) -> str | None:
        """The nodes' compute-turn lock (``--compute-turns``), None without turns."""
        if not self.config.compute_turns or self._tmp is None:
            return None
        return str(Path(self._tmp.name) / "compute-turns")

    def restart_node(self, name: str, wait: bool = True) -> None:
        """Start node ``name`` again, with the same node id, role and TP, after its process
        exited (``RuntimeError`` if it still runs; ``KeyError`` for a name never started)."""
        self._nodes[name]                              # KeyError for an unknown name
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {proc.pid})")
        self._spawn_node(name, wait)

    def _spawn_node(self, name: str, wait: bool) -> None:
        role, tp = self._nodes[name]
        turns = ["--compute-turns", self.turns_path] if self.turns_path else []
        proc = self._spawn(name, [
            f"{role}_node", "--router", ",".join(self.router_controls), "--node-id", name,
            "--model", self.config.model, "--tp", str(tp),
            "--kv-transport", self.config.kv_transport,
            "--kv-address", f"tcp://{self.config.host}:*",
            "--nice", str(self.config.node_nice), *turns, *self.config.node_args,
            *(self.config.prefill_args if role == "prefill" else self.config.decode_args)],
            {MULTIPROC_DIR_ENV: None})             # a node's /metrics is its own
        deadline = time.monotonic() + self.config.startup_timeout_s
        for url in self.router_urls if wait else ():
            while self.health(url).get("nodes", {}).get(name, {}).get("pid") != proc.pid:
                self._check_alive(proc, name, deadline)    # registered as this very process
                time.sleep(0.1)

    def health(self, url: str | None = None) -> dict:
        """The router's ``/health`` body (whatever its status code); ``url``: one worker's
        own listener (default: the first worker's)."""
        try:
            with urllib.request.urlopen((url or self.router_urls[0]) + "/health",
                                        timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def wait_nodes(self, num_prefill: int, num_decode: int, deadline: float) -> None:
        """Block until every router worker has at least these many nodes registered
        (``RuntimeError`` on timeout or when a child exits)."""
        waiting = list(self.router_urls)
        while waiting:
            for name, proc in self.procs.items():
                self._check_alive(proc, name, deadline)
            h = self.health(waiting[0])
            if h.get("prefill_nodes", 0) >= num_prefill and h.get("decode_nodes", 0) >= num_decode:
                waiting.pop(0)
                continue
            time.sleep(0.1)

    def _check_alive(self, proc: subprocess.Popen, name: str, deadline: float) -> None:
        if proc.poll() is not None:
            where = f"; see {self.config.log_dir}/{name}.log" if self.config.log_dir else ""
            raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up{where}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster was not ready within {self.config.startup_timeout_s} s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to child ``name`` and wait for it to exit."""
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM every child (nodes first), SIGKILL those still up after ``timeout_s``;
        return their exit codes."""
        order = sorted(self.procs, key=lambda n: n.startswith("router"))
        for name in order:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name in order:
            proc = self.procs[name]
            try:
                codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        self.procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return codes

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
