"""Responder over synthetic events: several sequences on one queue (n, best_of, prompts),
echo with prompt logprobs, streamed interleaving; a real Dispatcher (unstarted) and the
real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from conftest import needs_smollm2
from disagg.logprobs import TokenLogprobs
from disagg.sampling_params import SamplingParams
from router.dispatch import Dispatcher
from router.inflight import Event, Inflight
from router.metrics import RouterMetrics
from router.nodes import NodeRegistry
from router.openapi_schema import ChatCompletion, Completion
from router.policy import make_policy
from router.responder import Responder, ResponseSpec
from router.streaming import SSEResponse
from disagg.model.tokenizer import ModelTokenizer

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return ModelTokenizer.from_dir(smollm2_dir)


@pytest.fixture
def dispatcher():
    d = Dispatcher(NodeRegistry("m"), make_policy("local"), RouterMetrics(CollectorRegistry()),
                   "tcp://127.0.0.1:*")
    yield d
    asyncio.run(d.close())


def ids(tok, text: str) -> list[int]:
    return tok.encode(text)


def sequences(prompts: list[list[int]], copies: int, logprobs: int | None = None,
              prompt_logprobs: int | None = None) -> list[Inflight]:
    events: asyncio.Queue = asyncio.Queue()
    params = SamplingParams(max_tokens=8, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    reqs = []
    for prompt in prompts:
        for _ in range(copies):
            req = Inflight(f"r{len(reqs)}", prompt, params, [], 0.0, "decode-0", None, "local",
                           index=len(reqs))
            req.events = events
            reqs.append(req)
    return reqs


def lp(token_id: int, logprob: float) -> TokenLogprobs:
    return TokenLogprobs(token_id, logprob, [(token_id, logprob)])


def test_best_of_returns_the_most_likely_and_hides_logprobs(dispatcher, tok):
    reqs = sequences([ids(tok, "Hi")], copies=3, logprobs=0)
    outs = [" one", " two", " three"]
    scores = [-3.0, -0.5, -2.0]
    for req, text, score in zip(reqs, outs, scores):
        t = ids(tok, text)
        req.deliver(Event(t, [lp(x, score / len(t)) for x in t], True, "stop", text))
    spec = ResponseSpec(chat=False, n=1, copies=3)
    body = asyncio.run(Responder(dispatcher, reqs, tok, "m", spec).whole())
    Completion.model_validate(body)
    assert [(c["index"], c["text"], c["logprobs"]) for c in body["choices"]] == [(0, " two", None)]
    assert body["usage"]["prompt_tokens"] == len(reqs[0].prompt)
    assert body["usage"]["completion_tokens"] == sum(len(ids(tok, t)) for t in outs)


def test_prompts_times_n_are_indexed_prompt_major(dispatcher, tok):
    reqs = sequences([ids(tok, "A"), ids(tok, "B c")], copies=2)
    for req in reversed(reqs):                        # arrival order does not matter
        req.deliver(Event(ids(tok, f" {req.rid}"), [None], True, "length", f" {req.rid}"))
    spec = ResponseSpec(chat=True, n=2, copies=2)
    body = asyncio.run(Responder(dispatcher, reqs, tok, "m", spec).whole())
    ChatCompletion.model_validate(body)
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [
        (0, " r0"), (1, " r1"), (2, " r2"), (3, " r3")]
    assert body["usage"]["prompt_tokens"] == len(ids(tok, "A")) + len(ids(tok, "B c"))


def test_echo_with_logprobs_whole_and_streamed(dispatcher, tok):
    prompt = ids(tok, "The cat")
    plps = [None] + [TokenLogprobs(t, -1.0, [(t, -1.0)]) for t in prompt[1:]]
    gen = ids(tok, " sat")
    spec = ResponseSpec(chat=False, logprobs=1, echo_texts=("The cat",))

    def run(stream: bool):
        reqs = sequences([prompt], 1, logprobs=1, prompt_logprobs=1)
        reqs[0].deliver(Event(gen, [lp(t, -0.25) for t in gen], True, "stop", " sat",
                              prompt_logprobs=plps))
        responder = Responder(dispatcher, reqs, tok, "m", spec)
        if not stream:
            return asyncio.run(responder.whole())
        return asyncio.run(_collect(responder))

    body = run(stream=False)
    Completion.model_validate(body)
    choice = body["choices"][0]
    assert choice["text"] == "The cat sat"
    lps = choice["logprobs"]
    assert lps["tokens"] == [tok.token_text(t) for t in prompt + gen]
    assert lps["token_logprobs"] == [None] + [-1.0] * (len(prompt) - 1) + [-0.25] * len(gen)
    assert lps["top_logprobs"][0] is None
    assert lps["text_offset"][len(prompt)] == len("The cat")

    events = run(stream=True)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "The cat sat"
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_echo_with_logprobs_but_no_prompt_logprobs_is_a_server_error(dispatcher, tok):
    reqs = sequences([ids(tok, "The cat")], 1, logprobs=0, prompt_logprobs=0)
    reqs[0].deliver(Event(ids(tok, " sat"), [lp(1, -1.0)], True, "stop", " sat"))
    spec = ResponseSpec(chat=False, logprobs=0, echo_texts=("The cat",))
    events = asyncio.run(_collect(Responder(dispatcher, reqs, tok, "m", spec)))
    error = json.loads(events[0][6:])["error"]
    assert error["type"] == "server_error" and "prompt logprobs" in error["message"]


async def _collect(responder: Responder) -> list[bytes]:
    """The stream's SSE events (one write may carry several), through the ASGI response
    the router returns, with a client that stays."""
    messages = []

    async def send(message: dict) -> None:
        messages.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()

    await SSEResponse(responder)({"type": "http"}, receive, send)
    assert messages[0]["type"] == "http.response.start"
    assert messages[-1]["type"] == "http.response.body"
    assert [m["more_body"] for m in messages[1:]] == [True] * (len(messages) - 2) + [False]
    writes = [m["body"] for m in messages[1:]]                 # the last ends the body too
    assert all(w.endswith(b"\n\n") for w in writes)
    return [e + b"\n\n" for e in b"".join(writes).split(b"\n\n")[:-1]]


def test_stream_interleaves_choices_with_their_index(dispatcher, tok):
    reqs = sequences([ids(tok, "Hi")], copies=2)
    a, b = ids(tok, " alpha beta"), ids(tok, " gamma delta")
    reqs[1].deliver(Event(b[:1], [None]))
    reqs[0].deliver(Event(a[:1], [None]))
    reqs[1].deliver(Event(b[1:], [None] * (len(b) - 1), True, "length", " gamma delta"))
    reqs[0].deliver(Event(a[1:], [None] * (len(a) - 1), True, "stop", " alpha beta"))
    spec = ResponseSpec(chat=True, n=2, copies=2, include_usage=True)
    events = asyncio.run(_collect(Responder(dispatcher, reqs, tok, "m", spec)))
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(a) + len(b)
    assert [c["choices"][0]["index"] for c in chunks] == [1, 0, 1, 0]
    for index, want, reason in [(0, " alpha beta", "stop"), (1, " gamma delta", "length")]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == want
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == reason


def test_timing_carries_the_request_times_until_the_receipt_is_known(dispatcher, tok):
    """``x-disagg-timing``: every chunk has ``sent_at``; the request's own times ride only
    on the chunks up to the first that knows the decode node's receipt."""
    (req,) = sequences([ids(tok, "Hi")], copies=1)
    req.arrival, req.dispatch_s = 10.0, 0.001
    toks = ids(tok, " one two three four")
    req.deliver(Event(toks[:1], [None], sent_at=11.0))        # a remote first token: no receipt
    events = [Event(toks[1:2], [None], sent_at=11.1), Event(toks[2:3], [None], sent_at=11.2),
              Event(toks[3:], [None] * (len(toks) - 3), True, "stop", " one two three four",
                    sent_at=11.3)]

    async def run() -> list[bytes]:
        responder = Responder(dispatcher, [req], tok, "m", ResponseSpec(chat=False, timing=True))
        collected = asyncio.ensure_future(_collect(responder))
        await asyncio.sleep(0)
        req.ingress_s = 0.002                                 # the decode node got it
        for event in events:
            req.deliver(event)
            await asyncio.sleep(0)
        return await collected

    chunks = [json.loads(e[6:]) for e in asyncio.run(run())[:-1]]
    timings = [c["disagg_timing"] for c in chunks]
    assert [t["sent_at"] for t in timings] == [11.0, 11.1, 11.2, 11.3]
    request_times = {"arrival": 10.0, "ingress_s": None, "dispatch_s": 0.001}
    assert timings[0] == {"sent_at": 11.0, **request_times}
    assert timings[1] == {"sent_at": 11.1, **request_times, "ingress_s": 0.002}
    assert timings[2:] == [{"sent_at": 11.2}, {"sent_at": 11.3}]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " one two three four"
