"""A router and its nodes as child processes on this machine.

``disagg serve``, the HTTP tests and the router benchmark all start their
deployments through :class:`LocalCluster`::

    with LocalCluster(ClusterConfig(prefill_tp=3, policy="remote")) as c:
        c.start()                      # router, then nodes; waits until all registered
        httpx.post(c.http_url + "/v1/completions", json=...)
        c.kill("prefill-0")            # SIGKILL one node (fault tests)
        c.start_node("prefill", tp=1)  # and bring up another

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

from transport.base import KINDS


@dataclass(frozen=True)
class ClusterConfig:
    """What to start. ``node_args`` are extra flags for every node (engine flags);
    ``prefill_args`` / ``decode_args`` go to that role's nodes only (after
    ``node_args``, so they win), e.g. ``("--cpus", "0", "--torch-threads", "1")``.

    ``node_nice``: nodes start with this nice value (``--nice``), the router with 0,
    so on shared cores the router's few milliseconds of work per engine step preempt
    the nodes' torch threads instead of queueing behind them. Measured with
    ``disagg bench router`` on 2 cores (benchmarks.md, "Router overhead"): nice 10
    cut the router-only overhead p50 from 3.3 to 1.8 ms at 1 stream and from 9.8 to
    8.1 ms at 32, tokens/s unchanged (the nodes still get every idle cycle)."""

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
    node_timeout_s: float = 3.0
    node_nice: int = 10
    node_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    log_dir: str | None = None
    startup_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        for name in ("prefill_tp", "decode_tp", "num_decode", "max_inflight"):
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


@dataclass
class LocalCluster:
    """Router + nodes as subprocesses (see the module docstring)."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    procs: dict = field(default_factory=dict)       # name → subprocess.Popen
    http_url: str = ""
    control_address: str = ""
    _counts: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    _tmp: tempfile.TemporaryDirectory | None = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = None
        if self.config.log_dir is not None:
            Path(self.config.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.config.log_dir) / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
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
        ready = Path(self._tmp.name) / "router.json"
        args = ["router", "--host", c.host, "--port", str(c.port), "--model", c.model,
                "--control-address", f"tcp://{c.host}:*", "--policy", c.policy,
                "--max-inflight", str(c.max_inflight), "--node-timeout-s", str(c.node_timeout_s),
                "--ready-file", str(ready)]
        for opt in c.policy_options:
            args += ["--policy-option", opt]
        if c.api_key:
            args += ["--api-key", c.api_key]
        router = self._spawn("router", args)
        deadline = time.monotonic() + c.startup_timeout_s
        while not ready.exists():
            self._check_alive(router, "router", deadline)
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.http_url, self.control_address = info["http"], info["control"]
        for _ in range(c.num_prefill):
            self.start_node("prefill", c.prefill_tp, wait=False)
        for _ in range(c.num_decode):
            self.start_node("decode", c.decode_tp, wait=False)
        self.wait_nodes(c.num_prefill, c.num_decode, deadline)
        return self

    def start_node(self, role: str, tp: int, wait: bool = True) -> str:
        """Start one more ``role`` node (named ``role-N``); return its name."""
        name = f"{role}-{self._counts[role]}"
        self._counts[role] += 1
        self._spawn(name, [f"{role}_node", "--router", self.control_address, "--node-id", name,
                           "--model", self.config.model, "--tp", str(tp),
                           "--kv-transport", self.config.kv_transport,
                           "--kv-address", f"tcp://{self.config.host}:*",
                           "--nice", str(self.config.node_nice), *self.config.node_args,
                           *(self.config.prefill_args if role == "prefill"
                             else self.config.decode_args)])
        if wait:
            have = self.health()
            self.wait_nodes(have.get("prefill_nodes", 0) + (role == "prefill"),
                            have.get("decode_nodes", 0) + (role == "decode"),
                            time.monotonic() + self.config.startup_timeout_s)
        return name

    def health(self) -> dict:
        """The router's ``/health`` body (whatever its status code)."""
        try:
            with urllib.request.urlopen(self.http_url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def wait_nodes(self, num_prefill: int, num_decode: int, deadline: float) -> None:
        """Block until at least these many nodes are registered (``RuntimeError`` on timeout
        or when a child exits)."""
        while True:
            for name, proc in self.procs.items():
                self._check_alive(proc, name, deadline)
            h = self.health()
            if h.get("prefill_nodes", 0) >= num_prefill and h.get("decode_nodes", 0) >= num_decode:
                return
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
        order = sorted(self.procs, key=lambda n: n == "router")
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
