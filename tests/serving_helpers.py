"""Helpers for the HTTP tests: clusters, `disagg serve` runs, requests, /metrics reads,
transformers references."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import hf_greedy
from disagg.cluster import ClusterConfig, LocalCluster

MODEL = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"disagg serve ready: (http://\S+/v1)\s+\(model (\S+); router pid (\d+), "
                   r"prefill pid (\d+), decode pid (\d+)\)")
SERVE = [sys.executable, "-m", "disagg.cli", "serve", "--port", "0",
         "--kv-cache-memory", "32MiB", "--max-num-seqs", "4"]


class Serve:
    """``disagg serve`` in a new session, its merged output collected by a thread."""

    def __init__(self, *extra: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.pop("DISAGG_API_KEY", None)
        self.proc = subprocess.Popen([*SERVE, *extra], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        """Everything printed so far (serve and its children)."""
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 240.0) -> re.Match:
        """The ready line's match, once printed; fail if serve exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := READY.search(line):
                    return m
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"disagg serve exited {self.proc.returncode} before ready:\n{self.output}")
            time.sleep(0.1)
        pytest.fail(f"no ready line within {timeout_s} s:\n{self.output}")

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        """Its exit code (fail the test if it is still running after ``timeout_s``)."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"disagg serve still running {timeout_s} s later:\n{self.output}")
        self._reader.join(5)
        return code

    def group_alive(self) -> bool:
        """Whether any process of its session (children included) still exists."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_all(self) -> None:
        """Clean-up: SIGKILL the whole process group, whatever is left of it."""
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def running_cluster(tmp_path_factory, **fields):
    """Yield a started :class:`LocalCluster` (for module fixtures): logs in a temp dir,
    64 MiB of KV per rank, ``fields`` for the rest of its :class:`ClusterConfig`."""
    cfg = ClusterConfig(log_dir=str(tmp_path_factory.mktemp("logs")),
                        node_args=("--kv-cache-memory", "64MiB"), **fields)
    with LocalCluster(cfg) as c:
        c.start()
        yield c


def post(url: str, path: str = "/v1/completions", key: str | None = None, timeout: float = 120,
         **body) -> httpx.Response:
    """POST ``body`` (JSON) to the router."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def metrics(url: str) -> dict:
    """The router's /metrics as ``{(name, frozenset(labels)): value}``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, **labels) -> float:
    """One sample's value (0 if absent)."""
    return metrics(url).get((name, frozenset(labels.items())), 0.0)


def wait_metric(url: str, name: str, want, timeout_s: float = 10.0, **labels) -> float:
    """Poll until ``want(value)`` holds (heartbeat-fed metrics lag); return the value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric(url, name, **labels)
        if want(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def settled_metric(url: str, name: str, quiet_s: float = 1.5, timeout_s: float = 15.0,
                   **labels) -> float:
    """The value once it has not moved for ``quiet_s`` (several heartbeats): a baseline
    that a previous request's late-reported counters can no longer change."""
    deadline = time.monotonic() + timeout_s
    value, since = metric(url, name, **labels), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = metric(url, name, **labels)
        if now != value:
            value, since = now, time.monotonic()
    return value


def reference(model_dir: str, tokenizer, prompt_ids: list[int],
              max_tokens: int) -> tuple[list[str], str]:
    """transformers' greedy continuation: per-token strings (what logprobs.tokens shows)
    and its text."""
    ids = hf_greedy(model_dir, prompt_ids, max_tokens)
    return [tokenizer.decode([t]) for t in ids], tokenizer.decode(ids, skip_special_tokens=True)


def greedy_tokens(url: str, prompt, max_tokens: int, key: str | None = None) -> tuple[list, str]:
    """Per-token strings and text of a greedy completion (asserts a 200)."""
    r = post(url, key=key, model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
             logprobs=0)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["text"]
