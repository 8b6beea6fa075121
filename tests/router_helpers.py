"""Helpers for the router tests: a real :class:`Dispatcher` whose outgoing messages
are recorded instead of sent, the ``Register`` message a node opens with, and a bare
router process (no nodes) started and waited for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from disagg.control import messages as m
from router.dispatch import Dispatcher
from router.metrics import MULTIPROC_DIR_ENV, RouterMetrics
from router.migration import MigrationConfig
from router.nodes import NodeRegistry
from router.policy import make_policy

MODEL = "m"
REPO = Path(__file__).resolve().parents[1]


def register_message(node_id: str, role: str = "decode", pid: int = 1,
                     block_size: int = 16) -> m.Register:
    """The ``Register`` a ``role`` node (process ``pid``) sends for model ``MODEL``; a
    decode node lists one (never dialled) KV address, a prefill node none."""
    return m.Register(node_id, role, 1, block_size, MODEL, 4096, 1000, 100, 64, "zmq",
                      ["tcp://127.0.0.1:1"] if role == "decode" else [], pid, "h")


def recording_dispatcher(policy: str = "local", migration: MigrationConfig | None = None,
                         unreachable: Iterable[str] = ()) -> Dispatcher:
    """An unstarted :class:`Dispatcher` (policy ``policy``) whose sends are appended to
    ``d.sent`` as ``(node_id, msg)`` instead of going out; a send to a node in
    ``unreachable`` is recorded too but reports failure. Its metrics live in ``d.prom``
    (a fresh :class:`CollectorRegistry`). The caller closes it:
    ``asyncio.run(d.close())``."""
    prom = CollectorRegistry()
    d = Dispatcher(NodeRegistry(MODEL), make_policy(policy), RouterMetrics(prom),
                   "tcp://127.0.0.1:*", migration)
    d.prom = prom
    d.sent = []
    unreachable = frozenset(unreachable)

    def send(node_id: str, msg, frame=None) -> bool:
        d.sent.append((node_id, msg))
        return node_id not in unreachable
    d.send = send
    return d


SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def router_exposition() -> dict[str, set[str]]:
    """``{sample name a query may use: its label names}`` from a real ``RouterMetrics``
    registry's exposition (every labelled family, tables of them included, gets one child
    first, so its label names show up)."""
    registry = CollectorRegistry()
    wrappers = []
    for value in vars(RouterMetrics(registry)).values():
        wrappers += list(value.values()) if isinstance(value, dict) else [value]
    for w in wrappers:
        if isinstance(w, MetricWrapperBase) and w._labelnames:
            w.labels(*("x" for _ in w._labelnames))
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        labels = {k for s in family.samples for k in s.labels}
        for suffix in SAMPLE_SUFFIXES[family.type]:
            out[family.name + suffix] = labels
    return out


def start_router(tmp: Path, name: str, port: int, *flags: str,
                 metrics_dir: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """``python -m router`` on HTTP ``port`` (0: a free one) with ``flags``, its output in
    ``tmp/NAME.log``; ``metrics_dir`` is its ``PROMETHEUS_MULTIPROC_DIR`` (None: unset).
    Returns the process and the path of its ready file (see :func:`router_ready`)."""
    ready = tmp / f"{name}.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop(MULTIPROC_DIR_ENV, None)
    if metrics_dir is not None:
        env[MULTIPROC_DIR_ENV] = str(metrics_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "--port", str(port), "--control-address",
         "tcp://127.0.0.1:*", "--ready-file", str(ready), *flags],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"), env=env)
    return proc, ready


def router_ready(proc: subprocess.Popen, ready: Path, log: Path) -> dict:
    """The router's ready file once written (``http``, ``own_http``, ``control``, ...);
    fails the test with its log if it exits first or takes over 60 s."""
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return json.loads(ready.read_text())
