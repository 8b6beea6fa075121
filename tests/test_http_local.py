"""Forced-local prefill over HTTP: router (policy "local") + prefill node + decode node;
outputs match transformers and /metrics shows every request took the local route; both
nodes switched to their uplinks (router/uplinks.py) on the way."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import needs_smollm2, random_prompts
from serving_helpers import greedy_tokens, metric, reference, running_cluster

pytestmark = [needs_smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, policy="local")


def test_forced_local_is_token_identical_and_counted(cluster, smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    url = cluster.http_url
    prompts = ["The capital of France is"] + random_prompts(2, 49152, 20, 60, seed=3)
    for prompt in prompts:
        ids = tok.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
        assert greedy_tokens(url, prompt, 16) == reference(smollm2_dir, tok, ids, 16), prompt
    assert metric(url, "disagg_requests_total", route="local", status="ok") == len(prompts)
    assert metric(url, "disagg_requests_total", route="remote", status="ok") == 0
    assert metric(url, "disagg_route_decisions_total", policy="local", route="local",
                  reason="always_local") == len(prompts)
    assert metric(url, "disagg_kv_transfer_bytes_total") == 0
    logs = Path(cluster.config.log_dir)
    for node in ("prefill-0", "decode-0"):
        assert "uplink open" in (logs / f"{node}.log").read_text(errors="replace"), node
