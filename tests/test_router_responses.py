"""Response builders, SSE framing and logprob converters (router.openai_responses).

The ``openai`` package's own pydantic types parse every builder's output,
which is what proves an OpenAI client can read our responses; our OpenAPI
response models (router.openapi_schema) must accept them too.
"""

from __future__ import annotations

import json
import math

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from disagg.logprobs import TokenLogprobs
from router import openapi_schema
from router.errors import ProtocolError
from router.openai_responses import (
    SSE_DONE, chat_choice, chat_chunk, chat_logprobs, chat_response, chat_usage_chunk,
    completion_choice, completion_chunk, completion_logprobs, completion_response,
    completion_usage_chunk, concat_logprobs, new_request_id, prompt_logprobs, sse, usage)

VOCAB = {1: " the", 2: " a", 3: "é", 4: " cat"}
LPS = [TokenLogprobs(token_id=1, logprob=-0.1, top=[(1, -0.1), (2, -2.5)]),
       TokenLogprobs(token_id=3, logprob=-float("inf"), top=[(4, -0.01), (2, -3.0)])]
TEXTS = [" the", "é"]


def test_request_ids_and_usage():
    a, b = new_request_id("cmpl"), new_request_id("cmpl")
    assert a != b and a.startswith("cmpl-") and len(a) == len("cmpl-") + 32
    with pytest.raises(ValueError):
        new_request_id("")
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_sse_framing():
    event = sse({"text": "é\n", "n": 1})
    assert event == 'data: {"text":"é\\n","n":1}\n\n'.encode("utf-8")
    assert event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    assert json.loads(event[len(b"data: "):]) == {"text": "é\n", "n": 1}
    assert SSE_DONE == b"data: [DONE]\n\n"
    err = ProtocolError(400, "bad", param="x")
    assert json.loads(sse(err.body())[6:])["error"]["param"] == "x"
    for bad in (float("nan"), float("inf"), -float("inf")):     # never emit invalid JSON
        assert json.loads(sse({"x": bad})[6:]) == {"x": None}
    assert sse({"s": "\u2028\x00\"", "k": {"日本": -0.5}}) == \
        'data: {"s":"\u2028\\u0000\\"","k":{"日本":-0.5}}\n\n'.encode("utf-8")


def test_completion_logprobs_format():
    lp = completion_logprobs(TEXTS, LPS, 10, VOCAB.__getitem__)
    assert lp["tokens"] == TEXTS
    assert lp["token_logprobs"] == [-0.1, -9999.0]           # -inf clamped
    assert lp["text_offset"] == [10, 14]
    assert lp["top_logprobs"][0] == {" the": -0.1, " a": -2.5}
    assert lp["top_logprobs"][1] == {" cat": -0.01, " a": -3.0, "é": -9999.0}
    json.loads(sse(lp)[6:])
    with pytest.raises(ValueError, match="2 token texts but 1"):
        completion_logprobs(TEXTS, LPS[:1], 0, VOCAB.__getitem__)
    with pytest.raises(ValueError, match="None"):
        completion_logprobs(["x"], [None], 0, VOCAB.__getitem__)


def test_chat_logprobs_format():
    lp = chat_logprobs(TEXTS, LPS, VOCAB.__getitem__)
    first, second = lp["content"]
    assert first == {"token": " the", "logprob": -0.1, "bytes": list(b" the"),
                     "top_logprobs": [
                         {"token": " the", "logprob": -0.1, "bytes": list(b" the")},
                         {"token": " a", "logprob": -2.5, "bytes": list(b" a")}]}
    assert second["bytes"] == [0xC3, 0xA9] and second["logprob"] == -9999.0
    assert [t["token"] for t in second["top_logprobs"]] == [" cat", " a"]


def test_completion_response_parses_with_openai():
    lp = completion_logprobs(TEXTS, LPS, 0, VOCAB.__getitem__)
    d = completion_response("cmpl-1", "m", 1700000000,
                            [completion_choice(0, " theé", "length", lp)], 5, 2)
    obj = Completion.model_validate(json.loads(sse(d)[6:]))
    openapi_schema.Completion.model_validate(d)
    assert obj.object == "text_completion" and obj.choices[0].text == " theé"
    assert obj.choices[0].finish_reason == "length" and obj.usage.total_tokens == 7
    assert obj.choices[0].logprobs.text_offset == [0, 4]
    assert math.isclose(obj.choices[0].logprobs.token_logprobs[0], -0.1)


def test_completion_chunks_parse_with_openai():
    last = Completion.model_validate(completion_chunk("c", "m", 1, "!", finish_reason="stop"))
    assert last.choices[0].finish_reason == "stop" and last.usage is None
    mid = completion_chunk("c", "m", 1, "tok")
    assert mid["choices"][0]["finish_reason"] is None and "usage" not in mid
    # openai's strict Literal has no None (its stream reader does not validate):
    Completion.model_validate(dict(mid, choices=[dict(mid["choices"][0], finish_reason="stop")]))
    u = Completion.model_validate(completion_usage_chunk("c", "m", 1, 4, 6))
    assert u.choices == [] and u.usage.completion_tokens == 6


def test_chat_response_and_chunks_parse_with_openai():
    lp = chat_logprobs(TEXTS, LPS, VOCAB.__getitem__)
    body = chat_response("chatcmpl-1", "m", 2, [chat_choice(0, "hi", "stop", lp)], 3, 1)
    full = ChatCompletion.model_validate(body)
    openapi_schema.ChatCompletion.model_validate(body)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == "hi"
    assert full.choices[0].logprobs.content[1].bytes == [0xC3, 0xA9]
    assert full.usage.prompt_tokens == 3
    first = ChatCompletionChunk.model_validate(chat_chunk("x", "m", 2, "", role_first=True))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].finish_reason is None
    mid = ChatCompletionChunk.model_validate(chat_chunk("x", "m", 2, "yo", logprobs=lp))
    assert mid.choices[0].delta.role is None and mid.choices[0].delta.content == "yo"
    end = ChatCompletionChunk.model_validate(chat_chunk("x", "m", 2, None, finish_reason="length"))
    assert end.choices[0].delta.content is None and end.choices[0].finish_reason == "length"
    u = ChatCompletionChunk.model_validate(chat_usage_chunk("x", "m", 2, 3, 4))
    assert u.choices == [] and u.usage.total_tokens == 7


@pytest.mark.parametrize("reason", ["abort", None, "eos"])
def test_builders_refuse_non_openai_finish_reasons(reason):
    with pytest.raises(ValueError, match="finish_reason"):
        completion_choice(0, "", reason)
    with pytest.raises(ValueError, match="finish_reason"):
        chat_choice(0, "", reason)
    if reason is not None:
        with pytest.raises(ValueError, match="finish_reason"):
            chat_chunk("c", "m", 1, "", finish_reason=reason)
        with pytest.raises(ValueError, match="finish_reason"):
            completion_chunk("c", "m", 1, "", finish_reason=reason)


def test_several_choices_keep_their_index():
    body = completion_response("c", "m", 1, [completion_choice(i, str(i), "stop") for i in range(3)],
                               2, 3)
    assert [c.index for c in Completion.model_validate(body).choices] == [0, 1, 2]
    chunk = Completion.model_validate(dict(completion_chunk("c", "m", 1, "x", "stop", index=2)))
    assert chunk.choices[0].index == 2
    chat = ChatCompletionChunk.model_validate(chat_chunk("c", "m", 1, "x", index=1, role_first=True))
    assert chat.choices[0].index == 1 and chat.choices[0].delta.role == "assistant"


def test_echoed_prompt_logprobs_first_entry_null():
    prompt_texts = [" the", " a", " cat"]
    plps = [None, TokenLogprobs(2, -1.5, [(1, -0.5), (2, -1.5)]), TokenLogprobs(4, -0.2, [])]
    echo = prompt_logprobs(prompt_texts, plps, VOCAB.__getitem__)
    assert echo == {"tokens": prompt_texts, "token_logprobs": [None, -1.5, -0.2],
                    "top_logprobs": [None, {" the": -0.5, " a": -1.5}, {" cat": -0.2}],
                    "text_offset": [0, 4, 6]}
    gen = completion_logprobs(TEXTS, LPS, 10, VOCAB.__getitem__)
    both = concat_logprobs(echo, gen)
    assert both["tokens"] == prompt_texts + TEXTS and both["text_offset"] == [0, 4, 6, 10, 14]
    assert concat_logprobs(echo, None) is echo
    body = completion_response("c", "m", 1, [completion_choice(0, " the a cat theé", "stop", both)],
                               3, 2)
    # openai's types say list[float], but OpenAI and vLLM send this null and the client
    # does not validate; our schema says what we send
    obj = openapi_schema.Completion.model_validate(body)
    assert obj.choices[0].logprobs.token_logprobs[0] is None
    with pytest.raises(ValueError, match="3 prompt token texts but 2"):
        prompt_logprobs(prompt_texts, plps[:2], VOCAB.__getitem__)
