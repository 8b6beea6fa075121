"""Request validation of the OpenAI-compatible protocol layer (router.protocol's pydantic
models), from the raw JSON bytes as the app sees them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import ProtocolError
from router.model_limits import check_context, check_model, check_token_ids, default_max_tokens
from router.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, parse_request


def parse_completion_request(body) -> CompletionRequest:
    return parse_request(json.dumps(body), chat=False)


def parse_chat_request(body) -> ChatCompletionRequest:
    return parse_request(json.dumps(body), chat=True)

CMPL = {"model": "m", "prompt": "hello"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _with(base: dict, **changes) -> dict:
    body = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            body.pop(k)
        else:
            body[k] = v
    return body


_DROP = object()

BAD_COMPLETIONS = [
    # (changes, param)
    (dict(model=_DROP), "model"),
    (dict(model=""), "model"),
    (dict(model=3), "model"),
    (dict(prompt=_DROP), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[[]]), "prompt[0]"),
    (dict(prompt=[1, -2, 3]), "prompt[1]"),
    (dict(prompt=[1, 2.0]), "prompt[1]"),
    (dict(prompt=[1, True]), "prompt[1]"),
    (dict(prompt=["a", ""]), "prompt[1]"),
    (dict(prompt=[[1], []]), "prompt[1]"),
    (dict(prompt=[[1], [2, -1]]), "prompt[1][1]"),
    (dict(prompt=["a", 5]), "prompt[1]"),
    (dict(prompt={"text": "x"}), "prompt"),
    (dict(prompt=7), "prompt"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=5.0), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=3), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=False), "seed"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=["a", ""]), "stop[1]"),
    (dict(stop=["a", 1]), "stop[1]"),
    (dict(stop=5), "stop"),
    (dict(stream=1), "stream"),
    (dict(stream="true"), "stream"),
    (dict(stream_options={"include_usage": True}), "stream_options"),   # stream is false
    (dict(stream=True, stream_options=[]), "stream_options"),
    (dict(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=True), "logprobs"),
    (dict(echo="no"), "echo"),
    (dict(n=0), "n"),
    (dict(n=129), "n"),
    (dict(n=True), "n"),
    (dict(n=2.0), "n"),
    (dict(best_of=0), "best_of"),
    (dict(best_of=21), "best_of"),
    (dict(best_of=2, n=3), "best_of"),
    (dict(best_of=2, stream=True), "best_of"),
    (dict(suffix="x"), "suffix"),
    (dict(tools=[{"type": "function"}]), "tools"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(functions=[]), "functions"),
    (dict(function_call="auto"), "function_call"),
    (dict(parallel_tool_calls=False), "parallel_tool_calls"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {}}), "response_format"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias={"a": 1}), "logit_bias"),
    (dict(logit_bias={"-1": 1}), "logit_bias"),
    (dict(logit_bias={"1.5": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"5": True}), "logit_bias"),
    (dict(logit_bias=[5]), "logit_bias"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(user=5), "user"),
]


@pytest.mark.parametrize("changes,param", BAD_COMPLETIONS)
def test_bad_completion_bodies(changes, param):
    with pytest.raises(ProtocolError) as info:
        parse_completion_request(_with(CMPL, **changes))
    err = info.value
    assert err.status == 400 and err.param == param
    body = err.body()["error"]
    assert body == {"message": err.message, "type": "invalid_request_error",
                    "param": param, "code": None}
    assert param.split("[")[0].split(".")[0] in err.message


@pytest.mark.parametrize("body", [None, [], [CMPL], "x", 3, True])
def test_non_object_bodies(body):
    for parse in (parse_completion_request, parse_chat_request):
        with pytest.raises(ProtocolError) as info:
            parse(body)
        assert info.value.status == 400 and "JSON object" in info.value.message


def test_messages_name_the_problem():
    for changes, words in [(dict(tools=[]), "'tools' is not supported: tool calling"),
                           (dict(suffix="!"), "'suffix' is not supported"),
                           (dict(response_format={"type": "json_object"}), "'json_object'"),
                           (dict(best_of=2, stream=True), "'best_of' cannot be used with"),
                           (dict(max_tokens=0), "'max_tokens'"),
                           (dict(logit_bias={"x": 1}), "key 'x' is not a token id")]:
        with pytest.raises(ProtocolError, match=words):
            parse_completion_request(_with(CMPL, **changes))


@pytest.mark.parametrize("raw", ["{not json", b"\xff\xfe", "[" * 100_000,
                                 '{"prompt": ' + "[" * 100_000, "{" * 50_000, ""])
def test_invalid_and_absurdly_deep_json_is_a_400(raw):
    for chat in (False, True):
        with pytest.raises(ProtocolError) as info:
            parse_request(raw, chat)
        assert info.value.status == 400 and "JSON" in info.value.message


def test_completion_defaults_and_sampling_params():
    req = parse_completion_request(dict(CMPL, unknown_field=[1, 2], store=True))
    assert req == CompletionRequest(model="m", prompt="hello")
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k) == (16, 1.0, 1.0, -1)
    assert req.stop == () and req.include_usage is False and req.logprobs is None
    assert (req.n, req.copies, req.echo) == (1, 1, False)
    params = req.sampling_params(req.requested_max_tokens)
    assert params.top_k == 0 and params.max_tokens == 16 and params.logprobs is None
    assert not params.has_penalties and params.prompt_logprobs is None
    with pytest.raises(Exception):
        req.model = "other"                       # frozen


def test_unknown_fields_are_logged_at_debug(caplog):
    with caplog.at_level("DEBUG", logger="disagg.router"):
        parse_completion_request(dict(CMPL, metadata={"a": 1}, store=False))
    assert "ignoring unknown request fields: metadata, store" in caplog.text


def test_n_copies_get_derived_seeds():
    req = parse_completion_request(dict(CMPL, n=3, seed=2**64 - 2))
    assert req.copies == 3
    assert [req.sampling_params(4, i).seed for i in range(3)] == [2**64 - 2, 2**64 - 1, 0]
    unseeded = parse_completion_request(dict(CMPL, n=2))
    assert {unseeded.sampling_params(4, i).seed for i in range(2)} == {None}


def test_best_of_asks_the_engine_for_logprobs_only_when_ranking():
    req = parse_completion_request(dict(CMPL, n=2, best_of=4))
    assert req.copies == 4 and req.response_logprobs is None
    assert req.sampling_params(4).logprobs == 0              # ranked by cumulative logprob
    assert parse_completion_request(dict(CMPL, best_of=2, logprobs=3)).sampling_params(4).logprobs == 3
    assert parse_completion_request(dict(CMPL, n=2, best_of=2)).sampling_params(4).logprobs is None


def test_several_prompts_and_echo():
    req = parse_completion_request(dict(CMPL, prompt=[[1, 2], [3]], n=2, echo=True))
    assert req.prompt == ((1, 2), (3,)) and req.copies == 2
    assert req.sampling_params(4).prompt_logprobs is None     # echo without logprobs
    req = parse_completion_request(dict(CMPL, prompt=["a", "b"], echo=True, logprobs=2))
    params = req.sampling_params(4)
    assert params.prompt_logprobs == 2 and params.logprobs == 2 and params.needs_local_prefill


def test_penalties_and_logit_bias_reach_sampling_params():
    req = parse_completion_request(dict(CMPL, presence_penalty=0.5, frequency_penalty=-2,
                                        repetition_penalty=1.3, logit_bias={"7": -100, "3": 5}))
    assert req.logit_bias == {7: -100.0, 3: 5.0}
    params = req.sampling_params(4)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.5, -2.0, 1.3)
    assert params.logit_bias == ((3, 5.0), (7, -100.0)) and params.has_penalties
    assert parse_completion_request(dict(CMPL, logit_bias={})).sampling_params(4).logit_bias is None


def test_accepted_but_harmless_fields():
    req = parse_completion_request(dict(CMPL, response_format={"type": "text"},
                                        tool_choice="none", tools=None))
    assert req.response_format.type == "text"


def test_completion_full_body():
    req = parse_completion_request(dict(
        model="m", prompt=[[5, 0, 7]], max_tokens=3, temperature=0, top_p=0.5, top_k=4,
        seed=2**64 - 1, stop="\n", stream=True, stream_options={"include_usage": True},
        logprobs=20, echo=False, n=1, ignore_eos=True, user="u", max_tokens_extra=None))
    assert req.prompt == ((5, 0, 7),) and isinstance(req.temperature, float)
    assert req.stop == ("\n",) and req.include_usage is True
    params = req.sampling_params(req.requested_max_tokens)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (3, 0.0, 0.5, 4)
    assert (params.seed, params.stop, params.ignore_eos, params.logprobs) == (
        2**64 - 1, ("\n",), True, 20)
    assert params.greedy


@pytest.mark.parametrize("prompt,expected", [
    ("x", ("x",)), (["x"], ("x",)), ([3], ((3,),)), ([[3, 4]], ((3, 4),)),
    (["x", "y"], ("x", "y")), ([[1], [2, 3]], ((1,), (2, 3)))])
def test_prompt_forms(prompt, expected):
    assert parse_completion_request(_with(CMPL, prompt=prompt)).prompt == expected


def test_nulls_mean_defaults():
    req = parse_completion_request(dict(CMPL, max_tokens=None, temperature=None, stop=None,
                                        stream=None, n=None, logprobs=None, seed=None,
                                        tools=None, suffix=None))
    assert req == CompletionRequest(model="m", prompt="hello")


BAD_CHATS = [
    (dict(messages=_DROP), "messages"),
    (dict(messages=[]), "messages"),
    (dict(messages="hi"), "messages"),
    (dict(messages=["hi"]), "messages[0]"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": 5}]),
     "messages[1].content"),
    (dict(messages=[{"role": "user"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": []}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (dict(messages=[{"role": "assistant", "content": "x", "tool_calls": []}]), "messages[0]"),
    (dict(tools=[]), "tools"),
    (dict(logprobs=5), "logprobs"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(max_tokens=4, max_completion_tokens=5), "max_completion_tokens"),
    (dict(logprobs=1), "logprobs"),
    (dict(top_logprobs=3), "top_logprobs"),                  # without logprobs=true
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(temperature=3), "temperature"),
    (dict(n=0), "n"),
    (dict(model=None), "model"),
]


@pytest.mark.parametrize("changes,param", BAD_CHATS)
def test_bad_chat_bodies(changes, param):
    with pytest.raises(ProtocolError) as info:
        parse_chat_request(_with(CHAT, **changes))
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["param"] == param


def test_chat_valid_and_sampling_params():
    req = parse_chat_request(dict(CHAT, messages=[
        {"role": "system", "content": "be brief", "name": "x"},
        {"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}],
        max_completion_tokens=7, logprobs=True, top_logprobs=2, top_k=-1, stop=["a", "b"], n=2))
    assert isinstance(req, ChatCompletionRequest)
    assert req.messages[0] == ChatMessage(role="system", content="be brief")
    assert len(req.messages) == 3 and req.copies == 2
    params = req.sampling_params(req.requested_max_tokens)
    assert (params.max_tokens, params.logprobs, params.top_k, params.stop) == (7, 2, 0, ("a", "b"))
    assert parse_chat_request(dict(CHAT, max_tokens=9)).requested_max_tokens == 9
    assert parse_chat_request(dict(CHAT, logprobs=True)).sampling_params(100).logprobs == 0


def test_chat_content_parts_are_joined():
    req = parse_chat_request(dict(CHAT, messages=[{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]))
    assert req.messages[0].content == "one\ntwo"
    with pytest.raises(ProtocolError, match="type 'image_url'; only 'text' parts"):
        parse_chat_request(dict(CHAT, messages=[{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]}]))
    with pytest.raises(ProtocolError, match="type 'input_audio'"):
        parse_chat_request(dict(CHAT, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]))


def test_chat_without_max_tokens_takes_what_context_is_left():
    req = parse_chat_request(CHAT)
    assert req.requested_max_tokens is None and req.logprobs is False
    assert req.sampling_params(default_max_tokens(10, 64)).max_tokens == 54
    assert req.sampling_params(5).logprobs is None


def test_check_context_messages():
    check_context(10, 6, 16)                              # exactly fits
    with pytest.raises(ProtocolError) as info:
        check_context(10, 7, 16)
    err = info.value
    assert err.status == 400 and err.code == "context_length_exceeded" and err.param == "prompt"
    assert err.message.startswith(
        "This model's maximum context length is 16 tokens. However, you requested 17 tokens "
        "(10 in the prompt, 7 for the completion).")
    with pytest.raises(ProtocolError, match=r"\(3 in the messages, 20 for the completion\)"):
        check_context(3, 20, 16, param="messages")
    with pytest.raises(ProtocolError, match="empty") as info:
        check_context(0, 1, 16)
    assert info.value.status == 400


def test_default_max_tokens():
    assert default_max_tokens(15, 16) == 1
    with pytest.raises(ProtocolError, match="your request has 16 input tokens") as info:
        default_max_tokens(16, 16)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_token_id_range_and_model_checks():
    check_token_ids((0, 255), 256)
    with pytest.raises(ProtocolError, match="token id 256 at position 1") as info:
        check_token_ids((0, 256), 256)
    assert info.value.param == "prompt"
    with pytest.raises(ProtocolError) as info:
        check_token_ids([300], 256, "logit_bias")
    assert info.value.param == "logit_bias"
    check_model("a", ["a", "b"])
    with pytest.raises(ProtocolError) as info:
        check_model("c", ["a", "b"])
    assert info.value.status == 404 and info.value.code == "model_not_found"
    assert info.value.body()["error"]["param"] == "model"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=4),
    max_leaves=12)
_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "seed", "stop", "stream", "stream_options", "logprobs",
           "top_logprobs", "echo", "n", "best_of", "ignore_eos", "user", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logit_bias", "response_format", "tools"]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=8) | _JSON)
def test_any_body_gives_a_request_or_a_protocol_error(body):
    """Fuzz: whatever the JSON, only ProtocolError escapes, and valid requests build params."""
    bodies = [body, {**CMPL, **CHAT, **body}] if isinstance(body, dict) else [body]
    for parse, b in [(p, b) for p in (parse_completion_request, parse_chat_request)
                     for b in bodies]:
        try:
            req = parse(b)
        except ProtocolError as err:
            assert err.status == 400 and isinstance(err.message, str)
        else:
            for copy in range(req.copies):
                req.sampling_params(8, copy)
