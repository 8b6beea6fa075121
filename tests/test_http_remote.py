"""HTTP through real processes: router + prefill node (TP 3) + decode node (TP 1), every
request prefilled remotely, on the embedded SmolLM2; plus the HTTP error paths."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from conftest import needs_smollm2, random_prompts
from serving_helpers import (
    MODEL, greedy_tokens, metric, post, reference, running_cluster, settled_metric, wait_metric)

pytestmark = [needs_smollm2, pytest.mark.slow]

KEY = "test-key"
MAX_INFLIGHT = 4
BLOCK_BYTES = 16 * 30 * 2 * 3 * 64 * 4      # one SmolLM2 fp32 block: 16 tokens × 46,080 B


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, prefill_tp=3, decode_tp=1, policy="remote",
                               api_key=KEY, max_inflight=MAX_INFLIGHT)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_remote_prefill_is_token_identical_to_transformers(cluster, smollm2_dir, tok):
    url = cluster.http_url
    before = metric(url, "disagg_requests_total", route="remote", status="ok")
    prompts = ["The capital of France is", "def fibonacci(n):"] + random_prompts(2, 49152, 20, 60)
    for prompt in prompts:
        ids = tok.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
        tokens, text = greedy_tokens(url, prompt, 16, key=KEY)
        assert (tokens, text) == reference(smollm2_dir, tok, ids, 16), prompt
    assert metric(url, "disagg_requests_total", route="remote", status="ok") == before + 4
    assert metric(url, "disagg_requests_total", route="local", status="ok") == 0
    assert metric(url, "disagg_route_decisions_total", policy="remote", route="remote",
                  reason="always_remote") >= 4


def test_openai_client_streams(cluster):
    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=KEY)
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                      temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(chat)
    assert chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_cached_prefix_moves_only_missing_blocks(cluster):
    url = cluster.http_url
    base = random_prompts(1, 49152, 70, 71, seed=7)[0]          # 4 full blocks + 6 tokens
    sent0 = settled_metric(url, "disagg_kv_transfer_bytes_total")   # earlier tests' sends reported
    assert post(url, key=KEY, model=MODEL, prompt=base, max_tokens=2, temperature=0).status_code == 200
    sent1 = wait_metric(url, "disagg_kv_transfer_bytes_total", lambda v: v >= sent0 + 5 * BLOCK_BYTES)
    assert sent1 - sent0 == 5 * BLOCK_BYTES                      # nothing cached: all 5 blocks
    cached0 = metric(url, "disagg_decode_prefix_cached_tokens_total")
    longer = base[:64] + random_prompts(1, 49152, 30, 31, seed=8)[0]   # shares 4 blocks
    assert post(url, key=KEY, model=MODEL, prompt=longer, max_tokens=2,
                temperature=0).status_code == 200
    sent2 = wait_metric(url, "disagg_kv_transfer_bytes_total", lambda v: v >= sent1 + 2 * BLOCK_BYTES)
    assert sent2 - sent1 == 2 * BLOCK_BYTES                      # only blocks 5 and 6 moved
    assert metric(url, "disagg_decode_prefix_cached_tokens_total") - cached0 == 64


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 9000}, 400, "prompt"),
    ({"model": MODEL, "prompt": [5] * 8200, "max_tokens": 1}, 400, "prompt"),
    ({"model": MODEL, "prompt": [49152], "max_tokens": 1}, 400, "prompt"),
    ({"model": MODEL, "prompt": 42}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
])
def test_bad_requests_get_4xx_and_serving_goes_on(cluster, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
        else "/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else None
    r = httpx.post(cluster.http_url + path, headers=headers, content=content,
                   json=None if content else body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param), err
    ok = post(cluster.http_url, key=KEY, model=MODEL, prompt="Hello", max_tokens=2)
    assert ok.status_code == 200


def test_api_key(cluster):
    url = cluster.http_url
    assert post(url, model=MODEL, prompt="hi", max_tokens=1).status_code == 401
    r = post(url, key="wrong", model=MODEL, prompt="hi", max_tokens=1)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_overload_gets_429_then_recovers(cluster):
    async def one(client: httpx.AsyncClient):
        return await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "Tell me a story", "max_tokens": 24, "temperature": 0})

    async def burst():
        async with httpx.AsyncClient(base_url=cluster.http_url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            return await asyncio.gather(*[one(client) for _ in range(3 * MAX_INFLIGHT)])

    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) == {200, 429} and codes.count(200) >= MAX_INFLIGHT, codes
    limited = next(r for r in replies if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert post(cluster.http_url, key=KEY, model=MODEL, prompt="hi", max_tokens=2).status_code == 200


def test_client_disconnect_frees_the_request(cluster):
    url = cluster.http_url
    aborted = metric(url, "disagg_requests_total", route="remote", status="aborted")
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 400,
                            "temperature": 0, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: ") for line in got)
    assert wait_metric(url, "disagg_requests_total", lambda v: v == aborted + 1, route="remote",
                       status="aborted") == aborted + 1
    node = "decode-0"
    assert wait_metric(url, "disagg_queue_depth", lambda v: v == 0, node=node, role="decode") == 0
    assert wait_metric(url, "disagg_kv_usage_ratio", lambda v: v == 0, node=node,
                       role="decode") == 0


def test_stop_string_cut_the_same_streamed_or_not(cluster):
    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=KEY)
    args = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","])
    whole = client.completions.create(**args).choices[0]
    streamed = list(client.completions.create(stream=True, **args))
    assert whole.finish_reason == "stop" and "," not in whole.text and whole.text.strip()
    assert "".join(c.choices[0].text for c in streamed) == whole.text
    assert streamed[-1].choices[0].finish_reason == "stop"
