"""``disagg bench router``: the latency the router itself adds to a request.

Starts a router and one decode node as processes (:class:`LocalCluster`,
policy ``local``, no prefill node), so every request goes HTTP → router →
decode node and tokens come back decode node → router → HTTP. Requests carry
``x-disagg-timing: 1``, which makes every SSE chunk carry
``disagg_timing = {sent_at}``, and a request's first chunks (until the decode node's
receipt is known) also ``arrival, ingress_s, dispatch_s`` (``time.monotonic()`` of
processes on this host, so comparable)::

    ingress  = decode node received the Generate − router's HTTP arrival
    dispatch = the Generate left the router − router's HTTP arrival
    egress   = client got the chunk's bytes − decode node sent its tokens
    overhead = ingress + median egress of the request   (per request; the issue's measure)
    router-only overhead = dispatch + median egress   (without the node's step wait)

The client runs in this process on uvloop. By default (``--client stamped``)
each stream has its own keep-alive connection (:mod:`disagg.bench.stamped_http`)
that stamps a read in the event loop's first callback for the socket, before
any parsing, and wakes its stream only when the response has ended; the SSE
events are parsed once the whole level is over, so the client's CPU during
the level (``client_cpu_us_per_token``) is little more than the reads, as
if it ran on another machine. ``--client httpx`` reads through httpx, whose per-chunk parsing
(~0.3-0.4 ms of CPU each on 2 cores) delays every later stream's stamp in the
same loop turn and so lands in the egress figure. Both sides include what a one-host
deployment really pays: the node's uplink (``--uplinks off``: its ZeroMQ control
socket) and the router's ZeroMQ socket for the request, msgpack, the router's
detokenizing and SSE, uvicorn, loopback TCP, and waiting for CPU. Ingress also includes the
time a Generate waits in the node's socket for the node's loop to turn (the
node receives while its model runs, but not while it schedules or samples);
``node_step_ms`` (the gap between a request's consecutive token sends on the
node, about one engine step) is reported beside it. A request admitted during
a step is still computed from the next step on. To split egress between
the router and the client, ``egress_router_side_ms_mean`` is the router's own
``disagg_router_overhead_seconds{direction="egress"}`` mean over the level
(node sent → bytes handed to the socket, from ``/metrics``), and
``router_cpu_us_per_token`` the router processes' CPU time (user + system, every
worker) over the level divided by the tokens streamed: the per-token cost behind
the fan-out, less noisy than the latencies on a shared machine;
``client_cpu_us_per_token`` the same for this process (the client), which on a
small machine competes with the router for the cores. One engine step brings
every stream's token in one message, which the router writes out stream by
stream: ``step_fanout_ms`` is, over the steps that reached at least three
quarters of the streams, the median egress of each step's first, middle and
last stream (so ``median - first`` is the wait behind the other streams' chunks,
and ``first`` the node → router → client path itself).

The same run measures two floors through the same machine: a bare HTTP round
trip (``GET /health``) through the same client, and ``loopback_hop_us``, one
process sending a timestamp over loopback TCP to this process's event loop
(send → its callback running; no router, no HTTP): what every process-to-process
hop of the path pays here at the least, as wake-up and scheduling cost. The
request path crosses several such hops (client → router → node; node → router
→ client).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shlex
import shutil
import sys
import tempfile
import time
import urllib.parse

import psutil

from disagg.bench.loopback_hop import loopback_hop
from disagg.bench.router_figures import (
    ROUTER_ONLY_TARGET_P50_MS, TARGET_P50_MS, level_figures, parse_stream, percentiles)
from disagg.bench.stamped_http import Connection
from disagg.cpus import usable_cpus
from disagg.replay.server_metrics import scrape

PROMPTS = ("The capital of France is", "Write a haiku about the sea.", "Once upon a time",
           "List three prime numbers:", "Explain what a router does in one sentence.",
           "def fibonacci(n):", "The quick brown fox", "Translate 'good morning' to Spanish:")


def add_router_bench_args(p: argparse.ArgumentParser) -> None:
    """Add the ``disagg bench router`` flags to ``p``."""
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--kv-cache-memory", default="64MiB", help="the decode node's KV cache budget")
    p.add_argument("--concurrency", default="1,32", help="comma-separated concurrent streams")
    p.add_argument("--requests", type=int, default=8, help="requests per stream (sequential)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests before measuring")
    p.add_argument("--health-probes", type=int, default=200,
                   help="GET /health round trips for the bare-HTTP baseline, and as many "
                        "loopback hops for the process-to-process baseline")
    p.add_argument("--router-workers", type=int, default=1,
                   help="router processes sharing the HTTP port (disagg serve --router-workers)")
    p.add_argument("--uplinks", choices=("on", "off"), default="on",
                   help="on: the node sends its tokens on its uplink (router/uplinks.py); "
                        "off: on its ZeroMQ control socket (router --uplink-port -1)")
    p.add_argument("--client", choices=("stamped", "httpx"), default="stamped",
                   help="stamped: a lean HTTP/1.1 connection per stream that stamps each read "
                        "on arrival (disagg/bench/stamped_http.py); httpx: the general client, "
                        "whose own parsing of every stream's chunks delays the stamps")
    p.add_argument("--json", action="store_true", help="print compact JSON")


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--concurrency must be comma-separated ints >= 1, got {text!r}")
    return values


def _check(a: argparse.Namespace) -> list[int]:
    levels = _concurrencies(a.concurrency)
    for name in ("requests", "max_tokens", "health_probes", "router_workers"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    return levels


def _command(a: argparse.Namespace) -> str:
    return shlex.join(["disagg", "bench", "router", "--model", a.model, "--kv-cache-memory",
                       a.kv_cache_memory, "--concurrency", a.concurrency, "--requests",
                       str(a.requests), "--max-tokens", str(a.max_tokens), "--warmup",
                       str(a.warmup), "--health-probes", str(a.health_probes),
                       "--router-workers", str(a.router_workers), "--uplinks", a.uplinks,
                       "--client", a.client]
                      + (["--json"] if a.json else []))


async def _httpx_reads(client, url: str, body: dict, headers: dict) -> list:
    """The response body's reads through httpx, each stamped when httpx hands it over."""
    reads = []
    async with client.stream("POST", url + "/v1/completions", json=body,
                             headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"the router answered {resp.status_code}: "
                               f"{(await resp.aread()).decode(errors='replace')[:300]}")
        async for data in resp.aiter_raw():
            reads.append((time.monotonic(), data))      # stamped before any parsing
    return reads


async def _request(reads, model: str, prompt: str, max_tokens: int) -> tuple[float, list]:
    """One streamed completion, read through ``reads(body, headers)``: when it started
    and its ``(stamp, bytes)`` reads, parsed later by
    :func:`disagg.bench.router_figures.parse_stream` (nothing is parsed
    while streams run, so the client's CPU stays off the cores the router needs)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    return start, await reads(body, {"x-disagg-timing": "1"})


async def _level(streams_reads: list, model: str, per_stream: int,
                 max_tokens: int) -> tuple[list, float]:
    """``len(streams_reads)`` concurrent streams of ``per_stream`` sequential requests each,
    stream ``s`` reading its responses through ``streams_reads[s]``: every request's
    start and reads (unparsed), and the level's wall time."""
    streams = len(streams_reads)

    async def stream(s: int) -> list[tuple[float, list]]:
        return [await _request(streams_reads[s], model, PROMPTS[(s + i) % len(PROMPTS)],
                               max_tokens) for i in range(per_stream)]

    t0 = time.monotonic()
    raw = [r for rs in await asyncio.gather(*(stream(s) for s in range(streams))) for r in rs]
    return raw, time.monotonic() - t0


def _router_egress(url: str) -> tuple[float, float]:
    """The router's own egress histogram (node sent → bytes handed to the socket), over
    every router worker (their shared ``/metrics``): sum, count. Read between levels,
    never while streams run."""
    samples = scrape(url)
    if samples is None:
        raise RuntimeError(f"{url}/metrics did not answer as a disagg router")
    egress = frozenset({("direction", "egress")})
    return (samples.get(("disagg_router_overhead_seconds_sum", egress), 0.0),
            samples.get(("disagg_router_overhead_seconds_count", egress), 0.0))


class _Client:
    """The benchmark's HTTP client: ``stamped`` (one :class:`Connection` per stream, reads
    stamped on arrival) or ``httpx`` (one pooled httpx client; reads stamped when httpx
    hands them over, after its parsing). Untimed calls (models, metrics) use httpx."""

    def __init__(self, kind: str, url: str, http) -> None:
        self.kind, self.url, self.http = kind, url, http
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.conns: list[Connection] = []

    def readers(self, n: int) -> list:
        """``n`` stream readers: each ``async (body, headers) -> [(stamp, bytes), ...]``."""
        if self.kind == "httpx":
            return [functools.partial(_httpx_reads, self.http, self.url)] * n
        while len(self.conns) < n:
            self.conns.append(Connection(self.host, self.port))
        return [functools.partial(c.request, "POST", "/v1/completions") for c in self.conns[:n]]

    async def health_rtt(self, probes: int) -> dict:
        """``probes`` sequential ``GET /health`` round trips through this client."""
        times = []
        conn = Connection(self.host, self.port) if self.kind == "stamped" else None
        try:
            for _ in range(probes):
                t0 = time.monotonic()
                if conn is None:
                    await (await self.http.get(self.url + "/health")).aread()
                else:
                    await conn.request("GET", "/health")
                times.append(time.monotonic() - t0)
        finally:
            if conn is not None:
                conn.close()
        return {"probes": probes, **percentiles(times, 50, 99)}

    def close(self) -> None:
        for c in self.conns:
            c.close()


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds used so far by ``procs``."""
    return sum(sum(p.cpu_times()[:2]) for p in procs)


async def _drive(url: str, router_pids: list[int], a: argparse.Namespace,
                 levels: list[int]) -> dict:
    import httpx
    conns = max(levels) + 4
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    routers, me = [psutil.Process(pid) for pid in router_pids], [psutil.Process()]
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as http:
        client = _Client(a.client, url, http)
        try:
            model = (await http.get(url + "/v1/models")).json()["data"][0]["id"]
            _log(f"warming up ({a.warmup} requests, {a.client} client)")
            reader = client.readers(1)[0]
            for i in range(a.warmup):
                parse_stream(*await _request(reader, model, PROMPTS[i % len(PROMPTS)], a.max_tokens))
            baseline = await client.health_rtt(a.health_probes)
            _log(f"bare HTTP round trip (GET /health): p50 {baseline['p50']} ms")
            hop = await loopback_hop(a.health_probes)
            _log(f"loopback hop between two processes: p50 {hop['p50']} us")
            results = {}
            for streams in levels:
                _log(f"concurrency {streams}: {streams * a.requests} requests...")
                before = _router_egress(url)
                cpu0, mine0 = _cpu_seconds(routers), _cpu_seconds(me)
                raw, wall = await _level(client.readers(streams), model, a.requests,
                                         a.max_tokens)
                cpu, mine = _cpu_seconds(routers) - cpu0, _cpu_seconds(me) - mine0
                row = level_figures(streams, raw, wall)
                (s0, n0), (s1, n1) = before, _router_egress(url)
                row["router_cpu_us_per_token"] = round(cpu / max(row["tokens"], 1) * 1e6, 1)
                row["client_cpu_us_per_token"] = round(mine / max(row["tokens"], 1) * 1e6, 1)
                row["egress_router_side_ms_mean"] = round((s1 - s0) / (n1 - n0) * 1e3, 3) \
                    if n1 > n0 else None
                results[str(streams)] = row
                fan = row["step_fanout_ms"]
                _log(f"concurrency {streams}: overhead p50 {row['router_overhead_ms']['p50']} "
                     f"ms, router-only p50 {row['router_only_overhead_ms']['p50']} ms, router "
                     f"CPU {row['router_cpu_us_per_token']} us/token, client "
                     f"{row['client_cpu_us_per_token']}; a step's streams got their chunk "
                     f"after {fan.get('first')} / {fan.get('median')} / {fan.get('last')} ms "
                     f"(first / median / last) ({row['wall_s']} s)")
        finally:
            client.close()
    return {"client": a.client, "http_baseline": {"health_rtt_ms": baseline},
            "loopback_hop_us": hop, "results": results}


def _log(text: str) -> None:
    print(f"[bench router] {text}", file=sys.stderr, flush=True)


def run_router_bench(a: argparse.Namespace) -> dict:
    """Start the cluster, measure every concurrency level, stop the cluster; the report."""
    import uvloop

    from disagg.cluster import ClusterConfig, LocalCluster
    levels = _check(a)
    log_dir = tempfile.mkdtemp(prefix="disagg-bench-router-")
    # A node heartbeats between engine steps only; on a busy shared CPU a step can outlast
    # the default 3 s node timeout, and the router would drop the node mid-benchmark.
    cluster = LocalCluster(ClusterConfig(
        model=a.model, num_prefill=0, num_decode=1, policy="local", node_timeout_s=30.0,
        max_inflight=max(256, max(levels) * 2), log_dir=log_dir,
        router_workers=a.router_workers,
        router_args=() if a.uplinks == "on" else ("--uplink-port", "-1"),
        node_args=("--kv-cache-memory", a.kv_cache_memory)))
    ok = False
    try:
        _log(f"starting {a.router_workers} router process(es) + 1 decode node "
             f"(logs in {log_dir})")
        t0 = time.monotonic()
        cluster.start()
        _log(f"cluster up in {time.monotonic() - t0:.1f} s")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            measured = runner.run(_drive(cluster.http_url, cluster.router_pids(), a, levels))
        ok = True
    finally:
        cluster.stop()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            _log(f"failed; the router's and node's logs are kept in {log_dir}")
    cores = len(usable_cpus())
    return {"benchmark": "router_overhead",
            "path": "HTTP -> router -> decode node (policy local, no prefill node) and back",
            "policy": "local", "router_workers": a.router_workers,
            "uplinks": a.uplinks == "on", "model": a.model,
            "max_tokens": a.max_tokens,
            "device": f"cpu, {cores} cores", "command": _command(a),
            "target_p50_ms": TARGET_P50_MS,
            "router_only_target_p50_ms": ROUTER_ONLY_TARGET_P50_MS, **measured}
