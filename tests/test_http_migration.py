"""Request migration through real processes: SIGKILL the decode node serving greedy
streams once tokens arrived; every stream goes on on another decode node (or on one
started later) and its tokens and text are those of transformers' greedy run."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from conftest import needs_smollm2
from serving_helpers import MODEL, metric, metrics, reference, running_cluster, wait_metric

pytestmark = [needs_smollm2, pytest.mark.slow]

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the Roman Empire begins with",
    "Here is a detailed recipe for a chocolate cake. First,",
    "The three laws of thermodynamics state that",
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # a heartbeat timeout far above every wait below: only the connection's end can tell
    # the router a killed node is gone that fast
    yield from running_cluster(tmp_path_factory, policy="local", num_prefill=0, num_decode=2,
                               node_timeout_s=30.0)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


class Stream(threading.Thread):
    """One greedy streamed completion; its token strings and when each arrived."""

    def __init__(self, url: str, prompt: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt = url, prompt
        self.tokens: list[str] = []
        self.times: list[float] = []
        self.text = ""
        self.finish: str | None = None
        self.errors: list = []

    def run(self) -> None:
        body = dict(model=MODEL, prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0,
                    logprobs=0, stream=True)
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body,
                              timeout=300) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        self.errors.append(chunk["error"])
                        continue
                    choice = chunk["choices"][0]
                    self.text += choice["text"]
                    if choice["logprobs"]:
                        self.tokens += choice["logprobs"]["tokens"]
                        self.times += [time.monotonic()] * len(choice["logprobs"]["tokens"])
                    self.finish = choice["finish_reason"] or self.finish
        except Exception as exc:        # reported by the test
            self.errors.append(repr(exc))

    def first_after(self, t: float) -> float | None:
        """When the first token after ``t`` arrived."""
        return next((x for x in self.times if x > t), None)


def start_streams(url: str, prompts: list[list[int]], min_tokens: int = 4) -> list[Stream]:
    """Start one stream per prompt; return once each has ``min_tokens`` tokens."""
    streams = [Stream(url, p) for p in prompts]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 180
    while not all(len(s.tokens) >= min_tokens for s in streams):
        assert time.monotonic() < deadline, [(s.tokens, s.errors) for s in streams]
        assert not any(s.errors for s in streams), [s.errors for s in streams]
        time.sleep(0.01)
    return streams


def busiest_decode_node(url: str, num_streams: int) -> tuple[str, int]:
    """The decode node holding most of the streams (heartbeats' queue depths) and how many."""
    deadline = time.monotonic() + 30
    while True:
        depth = {dict(labels)["node"]: v for (name, labels), v in metrics(url).items()
                 if name == "disagg_queue_depth" and dict(labels)["role"] == "decode"}
        if sum(depth.values()) == num_streams:
            node = max(depth, key=depth.get)
            return node, int(depth[node])
        assert time.monotonic() < deadline, depth
        time.sleep(0.05)


def check(streams: list[Stream], refs: list[tuple[list[str], str]], killed_at: float) -> float:
    """Every stream complete and equal to its reference; the longest kill → next token gap."""
    for s in streams:
        s.join(timeout=240)
        assert not s.is_alive()
    for s, (ref_tokens, ref_text) in zip(streams, refs):
        assert s.errors == [], s.errors
        assert s.finish == "length" and len(s.tokens) == MAX_TOKENS
        assert s.tokens == ref_tokens and s.text == ref_text
    assert all(len([x for x in s.times if x <= killed_at]) < MAX_TOKENS for s in streams)
    return max(s.first_after(killed_at) - killed_at for s in streams)


def test_streams_of_a_killed_decode_node_finish_on_the_other(cluster, smollm2_dir, tok):
    url = cluster.http_url
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    refs = [reference(smollm2_dir, tok, p, MAX_TOKENS) for p in prompts]
    before = metric(url, "disagg_migrations_total", reason="disconnected")
    streams = start_streams(url, prompts)
    victim, serving = busiest_decode_node(url, len(prompts))
    killed_at = time.monotonic()
    cluster.kill(victim)
    dropped = wait_metric(url, "disagg_nodes", lambda v: v == 1, role="decode",
                          state="down", timeout_s=20)
    detected_s = time.monotonic() - killed_at
    gap = check(streams, refs, killed_at)
    assert dropped == 1 and detected_s < 10      # the heartbeat timeout is 30 s
    moved = metric(url, "disagg_migrations_total", reason="disconnected") - before
    assert moved == serving                     # every stream the killed node served
    assert metric(url, "disagg_migration_failures_total", reason="max_migrations") == 0
    print(f"\nkill -> node dropped (seen on /metrics) {detected_s:.2f} s; kill -> next "
          f"token of every stream: max {gap:.2f} s; {moved:.0f} streams moved")


def test_a_lone_decode_node_killed_then_replaced_resumes_parked_streams(cluster, smollm2_dir,
                                                                         tok):
    url = cluster.http_url
    assert cluster.health()["decode_nodes"] == 1            # the survivor of the test above
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    refs = [reference(smollm2_dir, tok, p, MAX_TOKENS) for p in prompts]
    before = metric(url, "disagg_migrations_total", reason="disconnected")
    streams = start_streams(url, prompts)
    killed_at = time.monotonic()
    cluster.kill(next(n for n in cluster.procs if n.startswith("decode")))
    assert wait_metric(url, "disagg_parked_requests", lambda v: v == 2, timeout_s=20) == 2
    cluster.start_node("decode", tp=1)
    gap = check(streams, refs, killed_at)
    assert metric(url, "disagg_migrations_total", reason="disconnected") - before == 2
    assert metric(url, "disagg_parked_requests") == 0
    assert metric(url, "disagg_migration_failures_total", reason="wait_timeout") == 0
    print(f"\nkill -> next token with a new node started meanwhile: {gap:.2f} s")
