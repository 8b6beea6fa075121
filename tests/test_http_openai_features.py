"""OpenAI features and refusals through real processes: router (policy "remote") + prefill
node + decode node on the embedded SmolLM2: n > 1, best_of, several prompts, echo (with
prompt logprobs forced to a local prefill), penalties and logit_bias reaching the engine,
chat content parts, refusals naming the option, absurd JSON, /openapi.json and /docs."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import needs_smollm2
from disagg.control import messages as m
from serving_helpers import MODEL, metric, post, running_cluster

pytestmark = [needs_smollm2, pytest.mark.slow]

MAX_INFLIGHT = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, policy="remote", max_inflight=MAX_INFLIGHT)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def greedy(url: str, prompt, max_tokens: int = 6, **extra) -> str:
    body = ok(post(url, model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra))
    return body["choices"][0]["text"]


def test_n_and_several_prompts_are_prompt_major(cluster, tok):
    url = cluster.http_url
    prompts = ["The capital of France is", "1, 2, 3,"]
    single = [greedy(url, p) for p in prompts]
    body = ok(post(url, model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0,
                   ignore_eos=True))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [single[0]] * 2 + [single[1]] * 2
    assert body["usage"] == {"prompt_tokens": sum(len(tok.encode(p, add_special_tokens=False)) for p in prompts),
                             "completion_tokens": 4 * 6,
                             "total_tokens": sum(len(tok.encode(p, add_special_tokens=False)) for p in prompts) + 24}


def test_seeded_n_gives_distinct_reproducible_choices(cluster):
    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="x")
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3,
                seed=1234)
    first = [c.text for c in client.completions.create(**args).choices]
    again = [c.text for c in client.completions.create(**args).choices]
    assert first == again and len(set(first)) > 1       # copy i samples with seed + i


def test_best_of_returns_n_without_logprobs(cluster):
    body = ok(post(cluster.http_url, model=MODEL, prompt="Tell me a joke.", max_tokens=5,
                   temperature=1.0, n=2, best_of=4, seed=7))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])
    with_lp = ok(post(cluster.http_url, model=MODEL, prompt="Tell me a joke.", max_tokens=5,
                      temperature=1.0, n=1, best_of=3, seed=7, logprobs=0))
    scores = sum(with_lp["choices"][0]["logprobs"]["token_logprobs"])
    copies = ok(post(cluster.http_url, model=MODEL, prompt="Tell me a joke.", max_tokens=5,
                     temperature=1.0, n=3, seed=7, logprobs=0))
    best = max(sum(c["logprobs"]["token_logprobs"]) for c in copies["choices"])
    assert scores == pytest.approx(best)


def test_streamed_n_interleaves_indexed_chunks(cluster):
    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="x")
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                max_tokens=8, temperature=0, n=2)
    whole = client.chat.completions.create(**args)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert texts[0] == texts[1] and texts[0]


def test_echo_prepends_the_prompt(cluster, tok):
    url = cluster.http_url
    text = greedy(url, "Hello, my name is", echo=True)
    assert text == "Hello, my name is" + greedy(url, "Hello, my name is")
    ids = tok.encode("Hello there", add_special_tokens=False)
    assert greedy(url, ids, echo=True).startswith("Hello there")
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hello, my name is", max_tokens=6, temperature=0, echo=True,
        stream=True)]
    assert "".join(pieces) == text and pieces[0].startswith("Hello, my name is")


@pytest.mark.skipif("prompt_logprobs" not in m.Tokens.__struct_fields__,
                    reason="the Tokens control message does not carry prompt logprobs yet "
                           "(the lead adds the wire field); the response side is unit-tested "
                           "in test_router_responder.py")
def test_echo_with_logprobs_prefills_locally(cluster, tok):
    url = cluster.http_url
    before = metric(url, "disagg_route_decisions_total", policy="remote", route="local",
                    reason="prompt_logprobs")
    body = ok(post(url, model=MODEL, prompt="The capital of France is", max_tokens=3,
                   temperature=0, echo=True, logprobs=1))
    lps = body["choices"][0]["logprobs"]
    n_prompt = len(tok.encode("The capital of France is", add_special_tokens=False))
    assert lps["token_logprobs"][0] is None and len(lps["tokens"]) == n_prompt + 3
    assert all(isinstance(x, float) for x in lps["token_logprobs"][1:])
    assert metric(url, "disagg_route_decisions_total", policy="remote", route="local",
                  reason="prompt_logprobs") == before + 1


def test_logit_bias_and_penalties_reach_the_engine(cluster, tok):
    url = cluster.http_url
    target = tok.encode(" banana", add_special_tokens=False)[0]
    body = ok(post(url, model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=0,
                   logit_bias={str(target): 100}))
    assert body["choices"][0]["logprobs"]["tokens"] == [tok.decode([target])] * 4
    prompt = "the the the the the the the the"
    plain = greedy(url, prompt, max_tokens=8)
    assert greedy(url, prompt, max_tokens=8, frequency_penalty=2.0) != plain
    assert greedy(url, prompt, max_tokens=8, presence_penalty=2.0) != plain
    assert greedy(url, prompt, max_tokens=8, repetition_penalty=2.0) != plain


def test_chat_text_parts_equal_the_joined_string(cluster):
    url = cluster.http_url
    args = dict(model=MODEL, max_tokens=6, temperature=0, path="/v1/chat/completions")
    parts = ok(post(url, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Say hi"}, {"type": "text", "text": "politely."}]}], **args))
    joined = ok(post(url, messages=[{"role": "user", "content": "Say hi\npolitely."}], **args))
    assert parts["choices"][0]["message"] == joined["choices"][0]["message"]


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", "tool calling"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content", "image_url"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format",
     "json_object"),
    ("/v1/chat/completions", {"logprobs": 2}, "logprobs", "boolean"),
    ("/v1/completions", {"suffix": "end"}, "suffix", "suffix"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of", "stream"),
    ("/v1/completions", {"n": MAX_INFLIGHT + 1}, "n", "at most"),
    ("/v1/completions", {"prompt": ["a"] * 3, "n": 3}, "n", "at most"),
    ("/v1/completions", {"logit_bias": {"49152": 1}}, "logit_bias", "out of range"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty", "presence_penalty"),
])
def test_refusals_name_the_option(cluster, path, body, param, words):
    base = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                else {"prompt": "hi"})
    r = post(cluster.http_url, path=path, **{**base, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"model": ' + b"{" * 100_000,
                                     b"\xff\xfe\xfd", b"", b"null"])
def test_absurd_bodies_get_400(cluster, content):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(cluster.http_url + path, content=content, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_openapi_and_docs(cluster):
    url = cluster.http_url
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    op = doc["paths"]["/v1/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"}
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "n", "best_of", "echo", "logit_bias", "presence_penalty"} <= set(props)
    assert set(op["responses"]) >= {"200", "400", "401", "404", "429", "503"}
    docs = httpx.get(url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    json.dumps(doc)
