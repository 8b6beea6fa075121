"""Open-loop load generator for any OpenAI-compatible ``/v1/completions`` endpoint.

Requests go out at their scheduled ``send_at_s`` whatever the server is doing
(open loop: a slow server gets a growing queue, as in production, instead of a
politely slower client). Each one streams; the generator records when it was
sent, when each chunk carrying text arrived, when the stream ended, the token
counts from the final usage chunk, the text, and the outcome::

    schedule ──sleep until t0+send_at──▶ task r0 ─ POST stream ─▶ chunks ─▶ RequestResult
                                 └────▶ task r1 ─ ...            (appended when done)

Prompts are token-id lists (``"prompt": [ids]``) so the server sees exactly
the shaped lengths; ``ignore_eos`` (vLLM, llama.cpp and this project accept
it) makes it generate exactly ``max_tokens``. Times in the results are seconds
since the run started. Ctrl-C (or ``stop``) ends the run early: requests not
yet sent are skipped, requests in flight are cancelled and left out, and what
finished is returned with ``interrupted=True``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field

import httpx

from disagg.replay.progress import Progress
from disagg.replay.report import RequestResult
from disagg.replay.shaping import ShapedRequest


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """The endpoint to replay against.

    base_url: e.g. ``http://127.0.0.1:8000`` (``/v1/completions`` is appended).
    model: the ``model`` field sent with every request.
    api_key: sent as ``Authorization: Bearer``; None sends none.
    timeout_s: per request, from send to the last byte.
    ignore_eos: ask the server to generate exactly ``max_tokens``.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must be a non-empty name")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers every request carries."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class ReplayRun:
    """What one replay collected.

    duration_s: first send to last completion (what throughput divides by).
    max_send_lag_s: the latest any request went out after its schedule (a
        large value means the generator itself could not keep up).
    unsent / cancelled: requests skipped or cut off by an interruption.
    """

    results: list[RequestResult] = field(default_factory=list)
    duration_s: float = 0.0
    max_send_lag_s: float = 0.0
    interrupted: bool = False
    unsent: int = 0
    cancelled: int = 0


def request_body(req: ShapedRequest, target: TargetConfig) -> dict:
    """The JSON body for one shaped request."""
    body = {"model": target.model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


def _error_text(status: int, raw: bytes) -> str:
    """``HTTP 429: message`` from an error response (OpenAI body or plain text)."""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip()
    return f"HTTP {status}: {message}"[:300]


async def send_one(client: httpx.AsyncClient, rid: str, req: ShapedRequest,
                   target: TargetConfig, t0: float) -> RequestResult:
    """Send ``req`` and stream its answer; never raises for server or network errors."""
    res = RequestResult(request_id=rid, send_time=time.perf_counter() - t0, first_token_time=None,
                        prompt_tokens=len(req.prompt_token_ids))
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=request_body(req, target),
                                 headers=target.headers) as resp:
            if resp.status_code != 200:
                res.status, res.error = "error", _error_text(resp.status_code, await resp.aread())
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        res.status = "error"
                        res.error = str(event["error"].get("message", event["error"]))[:300]
                        break
                    text = "".join(c.get("text") or "" for c in event.get("choices") or ())
                    if text:
                        res.text += text
                        now = time.perf_counter() - t0
                        res.token_times.append(now)
                        chunks += 1
                        if res.first_token_time is None:
                            res.first_token_time = now
                    usage = event.get("usage")
                    if usage:
                        res.output_tokens = int(usage.get("completion_tokens", 0))
                        res.prompt_tokens = int(usage.get("prompt_tokens", res.prompt_tokens))
    except Exception as exc:    # noqa: BLE001 — any failure is this request's error, not the run's
        res.status, res.error = "error", f"{type(exc).__name__}: {exc}"[:300]
    res.end_time = time.perf_counter() - t0
    if res.output_tokens == 0:          # no usage chunk: count text chunks
        res.output_tokens = chunks
    if res.status == "ok" and res.first_token_time is None:
        res.status, res.error = "error", "the stream ended without any output"
    return res


async def replay_async(requests: list[ShapedRequest], target: TargetConfig,
                       stop: asyncio.Event | None = None, progress: Progress | None = None,
                       ) -> ReplayRun:
    """Send ``requests`` open-loop at their ``send_at_s`` and collect the results."""
    stop = stop or asyncio.Event()
    run = ReplayRun()
    order = sorted(range(len(requests)), key=lambda i: requests[i].send_at_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(target.timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=target.base_url.rstrip("/"), limits=limits,
                                 timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled():
                run.results.append(task.result())
                if progress:
                    progress.done(task.result().status == "ok")

        async def schedule() -> None:
            for n, i in enumerate(order):
                req = requests[i]
                delay = t0 + req.send_at_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                run.max_send_lag_s = max(run.max_send_lag_s,
                                         time.perf_counter() - t0 - req.send_at_s)
                task = asyncio.create_task(send_one(client, f"r{i}", req, target, t0))
                task.add_done_callback(finished)
                tasks.add(task)
                if progress:
                    progress.sent()
            while tasks:
                await asyncio.wait(set(tasks))

        worker = asyncio.create_task(schedule())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not worker.done():
            run.interrupted = True
            worker.cancel()
            run.cancelled = len(tasks)
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(worker, *tasks, return_exceptions=True)
        stopper.cancel()
        run.unsent = len(requests) - len(run.results) - run.cancelled
        if run.results:
            first = min(r.send_time for r in run.results)
            run.duration_s = max(r.end_time for r in run.results) - first
    return run


def replay(requests: list[ShapedRequest], target: TargetConfig, show_progress: bool = True,
           label: str = "replay") -> ReplayRun:
    """Run ``replay_async`` on uvloop (when installed); Ctrl-C stops it cleanly."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()

    async def main() -> ReplayRun:
        stop = asyncio.Event()
        try:
            loop.add_signal_handler(signal.SIGINT, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):   # not the main thread
            pass
        progress = Progress(len(requests), label) if show_progress else None
        try:
            if progress:
                progress.start()
            return await replay_async(requests, target, stop, progress)
        finally:
            if progress:
                await progress.close()
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())   # streams left by ``break``
        loop.close()
