"""One ``StepTokens`` per engine step: the decode node packs every request's tokens of a
step into it, and the router fans it out exactly as if each ``Tokens`` had come alone
(remote first token skipped, prompt logprobs on the first, unknown rids aborted, route
accounting), one bad item not starving the others."""

from __future__ import annotations

import asyncio

import pytest

from decode_node.handler import DecodeHandler
from disagg.control import messages as m
from disagg.engine.outputs import KVLoadTarget, RequestOutput
from disagg.logprobs import TokenLogprobs
from disagg.sampling_params import SamplingParams
from router.dispatch import Dispatcher
from router.inflight import Inflight
from router_helpers import recording_dispatcher, register_message

LP = [7, -0.25, [[7, -0.25]]]
NODE = register_message("decode-0")


@pytest.fixture
def dispatcher():
    """A recording Dispatcher (``d.sent``) with decode node ``decode-0`` registered."""
    d = recording_dispatcher()
    try:
        d.handlers.handle("decode-0", NODE, b"")
        assert d.sent == [("decode-0", m.Registered("decode-0", d.router_id, d.uplink_port))]
        d.sent.clear()
        yield d
    finally:
        asyncio.run(d.close())


def inflight(d: Dispatcher, rid: str, route: str = "local") -> Inflight:
    req = Inflight(rid, [1, 2, 3], SamplingParams(max_tokens=8), [], 0.0, "decode-0",
                   "prefill-0" if route == "remote" else None, route)
    d.inflight[rid] = req
    return req


def tokens(rid, ids, output_len, finished=False, logprobs=(), route="", received_at=None,
           prompt_logprobs=None) -> m.Tokens:
    return m.Tokens(rid, list(ids), output_len, list(logprobs), finished,
                    "stop" if finished else None, "text" if finished else None, 0, route, 5.0,
                    received_at, prompt_logprobs)


def events(req: Inflight) -> list:
    out = []
    while not req.events.empty():
        out.append(req.events.get_nowait()[1])
    return out


def test_step_tokens_fan_out_like_single_messages(dispatcher):
    d = dispatcher
    local, remote, broken = inflight(d, "r0"), inflight(d, "r1", "remote"), inflight(d, "r2")
    remote.num_output = 1                       # its first token came from the prefill node
    step = m.StepTokens([
        tokens("r0", [5], 1, logprobs=[LP], received_at=0.25, prompt_logprobs=[None, LP]),
        tokens("r2", [9], 1, logprobs=[[1]]),  # a malformed logprob: this item fails alone
        tokens("r1", [7, 8], 2, finished=True, route="remote"),
        tokens("gone", [3], 4),                 # unknown and running: aborted on its node
        tokens("gone-too", [3], 4, finished=True)])
    d.handlers.handle("decode-0", step, m.encode(step))

    (e0,) = events(local)
    assert e0.token_ids == [5] and e0.logprobs == [TokenLogprobs(7, -0.25, [(7, -0.25)])]
    assert e0.sent_at == 5.0 and not e0.finished
    assert e0.prompt_logprobs == [None, TokenLogprobs(7, -0.25, [(7, -0.25)])]
    assert local.ingress_s == 0.25 and local.num_output == 1 and "r0" in d.inflight
    (e1,) = events(remote)
    assert e1.token_ids == [8] and e1.finished and e1.finish_reason == "stop"
    assert "r1" not in d.inflight
    assert events(broken) == [] and "r2" in d.inflight
    assert d.sent == [("decode-0", m.Abort("gone"))]
    done = {(s.labels["route"], s.labels["status"]): s.value for f in d.prom.collect()
            for s in f.samples if s.name == "disagg_requests_total" and s.value}
    assert done == {("remote", "ok"): 1.0}


def test_tokens_from_another_node_are_aborted_there(dispatcher):
    d = dispatcher
    req = inflight(d, "r0")
    d.handlers.handle("decode-1", m.StepTokens([tokens("r0", [5], 1)]), b"")
    assert events(req) == []
    assert d.sent == [("decode-1", m.RegisterAgain("decode-1")), ("decode-1", m.Abort("r0"))]


def out(rid, new, total, finished=False, **kw) -> RequestOutput:
    return RequestOutput(rid, list(new), list(total), 3, 0, finished,
                         "length" if finished else None, **kw)


def test_decode_node_sends_one_step_tokens_per_step():
    sent = []
    handler = DecodeHandler(engine=None, send=sent.append)
    handler._received_at.update(a=1.0, b=2.0, c=3.0)
    handler._remote["b"] = "remote"
    target = KVLoadTarget([4], [0], 0, 3, "c")
    handler.on_outputs([out("a", [5], [5]), out("idle", [], [1]), out("b", [6], [9, 6], True),
                        RequestOutput("c", [], [], 3, 0, kv_load=target)])
    kv, step = sent
    assert isinstance(kv, m.KVTarget) and kv.rid == "c" and kv.received_at == 3.0
    assert [(t.rid, t.new_token_ids, t.output_len, t.finished, t.route, t.received_at)
            for t in step.items] == [("a", [5], 1, False, "", 1.0), ("b", [6], 2, True, "remote",
                                                                        2.0)]
    assert len({t.sent_at for t in step.items}) == 1
    assert m.decode(m.encode(step)) == step
    sent.clear()
    handler.on_outputs([out("idle", [], [1])])          # nothing new: nothing sent
    handler.on_outputs([out("a", [7], [5, 7])])
    (step,) = sent
    assert [(t.rid, t.received_at) for t in step.items] == [("a", None)]
