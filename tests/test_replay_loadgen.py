"""The open-loop load generator against a real (small) streaming HTTP server.

The server below is a genuine uvicorn + FastAPI app speaking the OpenAI
streaming completions format with timings we choose, so the generator's
schedule, per-token times, error handling and early stop can be checked
exactly. The end-to-end replay against ``disagg serve`` is in
``test_replay_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from disagg.replay.loadgen import TargetConfig, replay, replay_async, request_body
from disagg.replay.server_metrics import scrape, server_delta
from disagg.replay.shaping import ShapedRequest

# The first prompt id picks the server's behaviour.
SLOW, REFUSE, BREAK = 100, 0, 1
TOKEN_GAP_S = 0.05


def _app(arrivals: list[tuple[float, int]], counters: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        arrivals.append((time.perf_counter(), body["prompt"][0]))
        first, n = body["prompt"][0], body["max_tokens"]
        if first == REFUSE:
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit_error"}},
                                status_code=429)

        async def events():
            for i in range(n):
                await asyncio.sleep(1.0 if first == SLOW and i == 0 else TOKEN_GAP_S)
                if first == BREAK and i == 1:
                    yield "data: " + json.dumps({"error": {"message": "node lost"}}) + "\n\n"
                    return
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}) + "\n\n"
            counters["remote"] += 1
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            f'disagg_requests_total{{route="remote",status="ok"}} {counters["remote"]}\n'
            f'disagg_kv_transfer_bytes_total {1000 * counters["remote"]}\n')
    return app


@pytest.fixture(scope="module")
def server():
    arrivals: list[tuple[float, int]] = []
    counters = {"remote": 0}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(_app(arrivals, counters), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", arrivals
    srv.should_exit = True
    thread.join(10)


def _req(at: float, first: int, max_tokens: int = 4) -> ShapedRequest:
    return ShapedRequest(send_at_s=at, prompt_token_ids=[first, 5, 6], max_tokens=max_tokens,
                         source_index=0)


def test_request_body_is_token_ids_streaming_with_usage():
    body = request_body(_req(0, 7), TargetConfig(base_url="http://x", model="m"))
    assert body["prompt"] == [7, 5, 6] and body["max_tokens"] == 4 and body["stream"]
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    body = request_body(_req(0, 7), TargetConfig(base_url="http://x", model="m", ignore_eos=False))
    assert "ignore_eos" not in body


def test_target_config_rejects_bad_values():
    for kwargs, match in (({"base_url": "x:80", "model": "m"}, "base_url"),
                          ({"base_url": "http://x", "model": ""}, "model"),
                          ({"base_url": "http://x", "model": "m", "timeout_s": 0}, "timeout_s")):
        with pytest.raises(ValueError, match=match):
            TargetConfig(**kwargs)


def test_open_loop_schedule_and_token_times(server):
    url, arrivals = server
    arrivals.clear()
    # The first request takes over a second; the others must still go out on time.
    schedule = [0.0, 0.2, 0.4, 0.6]
    reqs = [_req(schedule[0], SLOW)] + [_req(t, 10 + i) for i, t in enumerate(schedule[1:])]
    run = replay(reqs, TargetConfig(base_url=url, model="m"), show_progress=False)
    assert not run.interrupted and run.unsent == 0 and len(run.results) == 4
    got = sorted(t for t, _ in arrivals)
    for want, at in zip(schedule, got):
        assert at - got[0] == pytest.approx(want, abs=0.08)
    by_id = {r.request_id: r for r in run.results}
    slow = by_id["r0"]
    assert slow.status == "ok" and slow.output_tokens == 4 and slow.prompt_tokens == 3
    assert slow.ttft >= 1.0 and len(slow.token_times) == 4
    assert slow.text == "t0t1t2t3"
    assert all(g == pytest.approx(TOKEN_GAP_S, abs=0.04) for g in slow.itl)
    assert slow.tpot == pytest.approx(TOKEN_GAP_S, abs=0.04)
    for r in by_id.values():
        assert r.send_time == pytest.approx(schedule[int(r.request_id[1:])], abs=0.08)
    assert run.duration_s == pytest.approx(max(r.end_time for r in run.results), abs=0.1)


def test_http_errors_and_stream_errors_are_recorded(server):
    url, _ = server
    run = replay([_req(0, REFUSE), _req(0, BREAK), _req(0, 42)],
                 TargetConfig(base_url=url, model="m"), show_progress=False)
    by_id = {r.request_id: r for r in run.results}
    assert by_id["r0"].status == "error" and by_id["r0"].error == "HTTP 429: busy"
    assert by_id["r1"].status == "error" and "node lost" in by_id["r1"].error
    assert by_id["r2"].status == "ok" and by_id["r2"].output_tokens == 4


def test_unreachable_endpoint_is_an_error_not_a_crash():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    run = replay([_req(0, 5)], TargetConfig(base_url=f"http://127.0.0.1:{port}", model="m"),
                 show_progress=False)
    assert run.results[0].status == "error" and "Connect" in run.results[0].error


def test_stop_keeps_what_finished(server):
    url, _ = server

    async def go():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.6, stop.set)
        reqs = [_req(0.0, 20, 2), _req(0.0, SLOW), _req(5.0, 21)]
        return await replay_async(reqs, TargetConfig(base_url=url, model="m"), stop)

    run = asyncio.run(go())
    assert run.interrupted
    assert [r.request_id for r in run.results] == ["r0"] and run.results[0].status == "ok"
    assert run.cancelled == 1 and run.unsent == 1


def test_server_metrics_delta(server):
    url, _ = server
    before = scrape(url)
    replay([_req(0, 30), _req(0, 31)], TargetConfig(base_url=url, model="m"),
           show_progress=False)
    delta = server_delta(before, scrape(url))
    assert delta["routes"] == {"remote": 2} and delta["statuses"] == {"ok": 2}
    assert delta["kv_bytes"] == 2000 and delta["fallbacks"] == 0
    assert server_delta(None, before) is None


def test_scrape_is_none_for_other_servers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert scrape(f"http://127.0.0.1:{port}") is None
