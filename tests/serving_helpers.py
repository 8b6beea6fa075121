"""Helpers for the HTTP tests: requests, /metrics reads, transformers references."""

from __future__ import annotations

import time

import httpx

from conftest import hf_greedy
from disagg.cluster import ClusterConfig, LocalCluster
from router.metrics import parse_prometheus_text

MODEL = "SmolLM2-135M-Instruct"


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
    return parse_prometheus_text(httpx.get(url + "/metrics", timeout=10).text)


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
