"""Seeded fault injection into a :class:`~disagg.cluster.LocalCluster`, and the leak check
after it.

The chaos test and ``scripts/fault_run.py`` drive a deployment with an open-loop request
stream while a :class:`FaultInjector` thread hits its nodes at random moments drawn from
one seed (so a failing run can be replayed)::

    gap ~ Exp(mean_gap_s) ─▶ pick a node ─▶ SIGKILL ─ restart_after_s ─▶ restart_node (same id)
                                       └──▶ SIGSTOP ─ stop_s ∈ [lo, hi] ─▶ SIGCONT

One fault at a time (the next gap starts when the node is back: restarted or continued,
and registered with the router again),
so the run sees every kind of loss — a node dying mid-prefill, mid-transfer, mid-stream,
or going silent past the router's node timeout and coming back — without a deployment
that has no node of a role for long. The router is never hit (its own restart is a
separate test). :func:`node_holdings` reads what every node's engine still holds from the
router's ``/metrics``; after the stream ends and the nodes are quiet, everything must be 0.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from disagg.cluster import LocalCluster
from disagg.engine.compute_turns import turn_holders
from router.metrics import NODE_HOLDINGS

log = logging.getLogger("disagg.chaos")

HOLDING_GAUGES = tuple(name for _, name, _ in NODE_HOLDINGS)
"""Per-node gauges (label ``node``) that are 0 on a node holding nothing."""


@dataclass(frozen=True)
class ChaosConfig:
    """What to inject and how often (seconds).

    seed: draws every gap, target and duration. mean_gap_s: mean of the exponential
    gap between one fault's end and the next fault. kill_share: the share of faults that
    are SIGKILL (the rest SIGSTOP). stop_s: (lo, hi) of a SIGSTOP's uniform duration (above
    the router's node timeout, the node is dropped and taken back). restart_after_s: a
    killed node's restart delay (as a supervisor's first back-off). roles: which roles
    are hit. start_after_s: quiet time before the first fault.
    """

    seed: int = 0
    mean_gap_s: float = 4.0
    kill_share: float = 0.5
    stop_s: tuple[float, float] = (1.0, 5.0)
    restart_after_s: float = 1.0
    roles: tuple[str, ...] = ("prefill", "decode")
    start_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("mean_gap_s", "restart_after_s", "start_after_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or (name == "mean_gap_s"
                                                                   and value == 0):
                raise ValueError(f"{name} must be a number >= 0 (mean_gap_s > 0), got {value!r}")
        if not 0 <= self.kill_share <= 1:
            raise ValueError(f"kill_share must be in [0, 1], got {self.kill_share!r}")
        lo, hi = self.stop_s
        if not 0 < lo <= hi:
            raise ValueError(f"stop_s must be (lo, hi) with 0 < lo <= hi, got {self.stop_s!r}")
        if not self.roles or not set(self.roles) <= {"prefill", "decode"}:
            raise ValueError(f"roles must be a non-empty subset of prefill, decode, "
                             f"got {self.roles!r}")


@dataclass
class Fault:
    """One injected fault: when (seconds since the injector started), what, on which node,
    and how long the node was gone (until restarted or continued)."""

    at_s: float
    action: str                 # "kill" | "stop"
    node: str
    down_s: float = 0.0


@dataclass
class FaultInjector:
    """A thread injecting :class:`ChaosConfig`'s faults into ``cluster`` until stopped.

    ``start()`` / ``stop()`` (``stop`` waits for the fault in progress to end: a stopped
    node is continued, a killed one restarted); ``faults`` lists what happened.
    """

    cluster: LocalCluster
    config: ChaosConfig = field(default_factory=ChaosConfig)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._t0 = 0.0
        self.error: BaseException | None = None

    def start(self) -> "FaultInjector":
        """Begin injecting (returns self)."""
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120.0) -> list[Fault]:
        """Stop after the fault in progress is undone; return the faults injected
        (``RuntimeError`` if the injector itself failed, e.g. a node did not restart)."""
        self._halt.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the fault injector did not stop within {timeout_s} s")
        if self.error is not None:
            raise RuntimeError(f"fault injection failed: {self.error}") from self.error
        return self.faults

    def _targets(self) -> list[str]:
        return sorted(name for name, proc in self.cluster.procs.items()
                      if name.split("-")[0] in self.config.roles and proc.poll() is None)

    def _run(self) -> None:
        cfg = self.config
        try:
            if self._halt.wait(cfg.start_after_s):
                return
            while not self._halt.wait(self._rng.expovariate(1.0 / cfg.mean_gap_s)):
                targets = self._targets()
                if not targets:
                    continue
                name = self._rng.choice(targets)
                kill = self._rng.random() < cfg.kill_share
                stop_for = self._rng.uniform(*cfg.stop_s)
                fault = Fault(time.monotonic() - self._t0, "kill" if kill else "stop", name)
                self.faults.append(fault)
                began = time.monotonic()
                log.warning("chaos: %s %s at %.1f s", fault.action, name, fault.at_s)
                if kill:
                    self._kill_and_restart(name)
                else:
                    self._stop_and_continue(name, stop_for)
                fault.down_s = time.monotonic() - began
        except BaseException as exc:        # surfaced by stop(): the test must not pass
            self.error = exc

    def _kill_and_restart(self, name: str) -> None:
        proc = self.cluster.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(self.config.restart_after_s)
        self.cluster.restart_node(name, wait=True)

    def _stop_and_continue(self, name: str, seconds: float) -> None:
        proc = self.cluster.procs[name]
        proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGCONT)
        # back means registered again (a stop past the node timeout got it dropped)
        deadline = time.monotonic() + 60
        while self.cluster.health().get("nodes", {}).get(name, {}).get("state") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not register again within 60 s of SIGCONT")
            time.sleep(0.1)


def stop_in_turn(proc: subprocess.Popen, turns_path: str, watching: Callable[[], bool]) -> bool:
    """SIGSTOP ``proc`` at a moment it holds the compute turn at ``turns_path``, so it
    stays stopped holding it; look while ``watching()`` is true. False (``proc`` left
    running) if it never held the turn meanwhile."""
    while watching():
        if proc.pid in turn_holders(turns_path):
            proc.send_signal(signal.SIGSTOP)
            if proc.pid in turn_holders(turns_path):
                return True
            proc.send_signal(signal.SIGCONT)      # it let go just before the stop
        time.sleep(0.002)
    return False


def node_holdings(base_url: str) -> dict[str, dict[str, float]]:
    """``{node: {gauge: value}}`` of :data:`HOLDING_GAUGES` from the router's ``/metrics``."""
    text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in HOLDING_GAUGES and "node" in s.labels:
                out.setdefault(s.labels["node"], {})[s.name] = s.value
    return out


def wait_quiescent(base_url: str, nodes: list[str], timeout_s: float = 60.0
                   ) -> dict[str, dict[str, float]]:
    """Poll until every node in ``nodes`` reports holding nothing (all gauges 0, several
    heartbeats in a row); return the last reading either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while True:
        held = node_holdings(base_url)
        clean = all(node in held and not any(held[node].values()) for node in nodes)
        now = time.monotonic()
        if clean:
            quiet_since = quiet_since or now
            if now - quiet_since >= 1.5:
                return held
        else:
            quiet_since = None
        if now > deadline:
            return held
        time.sleep(0.25)
