"""Long runs of the fault story: a trace replayed through faults, and a soak.

    .venv/bin/python scripts/fault_run.py trace [--requests 500] [--out results/faults]
    .venv/bin/python scripts/fault_run.py soak  [--duration-s 1800] [--out results/faults]

Both start a deployment on this machine through ``LocalCluster``: a router, 1 prefill node
and 2 decode nodes (``--policy threshold``, prompts of 128+ tokens prefilled remotely).

``trace``: the first ``--requests`` records of the Azure conversation trace
(``traces/AzureLLMInferenceTrace_conv.csv``), shaped to this machine (``--rate``,
``--length-scale``, caps). First the reference: every request sent once through the same
deployment without faults, ``--reference-concurrency`` at a time (closed loop: as fast as
the machine serves them, so the long part of the run is the fault run); then the trace
replayed open-loop at its arrival times with a seeded :class:`~disagg.chaos.FaultInjector`
hitting the nodes throughout (SIGKILL + restart under the same id, SIGSTOP past the node
timeout and back). Reports failed requests, outputs that differ from the reference
(greedy), the faults, the routes, migrations and fallbacks, the fault run's latencies, and
what the nodes still hold afterwards.

``soak``: a steady open-loop stream (the same trace, shaped to ``--rate``) for
``--duration-s`` without faults, sampling every ``--sample-s`` the RSS and open file
descriptors of every process (router, nodes and their children) and the KV blocks and
requests each node holds. Reports the samples and, per process, the growth from the
first quarter's median to the last quarter's.

Prints a JSON summary and writes it (plus the per-request results and samples) under
``--out``. Exit status 1 when a request failed, an output differed, or a node was left
holding something.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from disagg.chaos import ChaosConfig, FaultInjector, node_holdings, wait_quiescent  # noqa: E402
from disagg.cluster import ClusterConfig, LocalCluster  # noqa: E402
from disagg.replay.loadgen import ReplayRun, TargetConfig, replay, send_one  # noqa: E402
from disagg.replay.report import summarize, write_jsonl  # noqa: E402
from disagg.replay.shaping import ShapeConfig, shape  # noqa: E402
from disagg.replay.traces import read_trace  # noqa: E402

TRACE = ROOT / "traces" / "AzureLLMInferenceTrace_conv.csv"
MODEL = "SmolLM2-135M-Instruct"
VOCAB, CONTEXT = 49152, 8192


def shaped(a: argparse.Namespace, n: int):
    """``n`` requests of the trace at ``a.rate`` req/s, lengths scaled and capped."""
    return shape(read_trace(TRACE), ShapeConfig(
        vocab_size=VOCAB, max_requests=n, target_rate=a.rate, length_scale=a.length_scale,
        max_input_tokens=a.max_input_tokens, max_output_tokens=a.max_output_tokens,
        max_model_len=CONTEXT, seed=a.seed))


def cluster_config(a: argparse.Namespace, log_dir: Path) -> ClusterConfig:
    return ClusterConfig(num_prefill=1, num_decode=2, policy="threshold",
                         policy_options=("min_remote_tokens=128",), log_dir=str(log_dir),
                         node_args=("--kv-cache-memory", a.kv_cache_memory))


def counters(url: str) -> dict:
    """Route, migration and fallback counters from the router."""
    from prometheus_client.parser import text_string_to_metric_families
    import httpx
    out: dict = {}
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "disagg_requests_total" and s.value:
                out.setdefault("requests", {})[f"{s.labels['route']}/{s.labels['status']}"] = s.value
            elif s.name in ("disagg_migrations_total", "disagg_fallbacks_total",
                            "disagg_node_restarts_total", "disagg_migration_failures_total") \
                    and s.value:
                key = s.name.removeprefix("disagg_").removesuffix("_total")
                label = next(iter(s.labels.values()), "")
                out.setdefault(key, {})[label] = s.value
    return out


def leaks(cluster: LocalCluster) -> dict:
    """What each node still holds once quiet (empty = nothing)."""
    nodes = [n for n in cluster.procs if n != "router"]
    cluster.wait_nodes(1, 2, time.monotonic() + 180)
    held = wait_quiescent(cluster.http_url, nodes, timeout_s=90)
    return {n: {g: v for g, v in held.get(n, {"missing": 1}).items() if v}
            for n in nodes if any(held.get(n, {"missing": 1}).values())}


def reference(requests, target: TargetConfig, concurrency: int) -> ReplayRun:
    """Each request once, ``concurrency`` at a time, through the same client code as the
    replay (request ids ``r<index>`` as there): the no-fault outputs."""
    import httpx

    async def go() -> ReplayRun:
        run, gate, t0 = ReplayRun(), asyncio.Semaphore(concurrency), time.perf_counter()
        async with httpx.AsyncClient(base_url=target.base_url.rstrip("/"),
                                     timeout=httpx.Timeout(target.timeout_s, connect=30.0)) as c:
            async def one(i: int):
                async with gate:
                    res = await send_one(c, f"r{i}", requests[i], target, t0)
                    run.results.append(res)
                    if len(run.results) % 25 == 0:
                        print(f"[reference] {len(run.results)}/{len(requests)} done "
                              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            await asyncio.gather(*(one(i) for i in range(len(requests))))
        run.duration_s = time.perf_counter() - t0
        return run
    return asyncio.run(go())


def run_trace(a: argparse.Namespace, out: Path) -> dict:
    requests = shaped(a, a.requests)
    with LocalCluster(cluster_config(a, out / "logs-trace")) as cluster:
        cluster.start()
        target = TargetConfig(base_url=cluster.http_url, model=MODEL, timeout_s=600)
        print(f"reference: {len(requests)} requests, {a.reference_concurrency} at a time, "
              "no faults", file=sys.stderr)
        ref = reference(requests, target, a.reference_concurrency)
        before = counters(cluster.http_url)
        print(f"fault run: {len(requests)} requests at {a.rate} req/s", file=sys.stderr)
        injector = FaultInjector(cluster, ChaosConfig(seed=a.seed, mean_gap_s=a.mean_gap_s,
                                                      stop_s=(1.0, 6.0))).start()
        try:
            stormy = replay(requests, target, label="faults")
        finally:
            faults = injector.stop(timeout_s=300)
        after = counters(cluster.http_url)
        left = leaks(cluster)
    write_jsonl(ref.results, out / "trace-reference.jsonl")
    write_jsonl(stormy.results, out / "trace-faults.jsonl")
    want = {r.request_id: r.text for r in ref.results if r.status == "ok"}
    got = {r.request_id: r for r in stormy.results}
    differ = sorted(rid for rid, text in want.items()
                    if rid in got and got[rid].status == "ok" and got[rid].text != text)
    kinds = {k: sum(f.action == k for f in faults) for k in ("kill", "stop")}
    return {
        "requests": len(requests), "rate_rps": a.rate, "seed": a.seed,
        "reference": {"failed": sum(r.status != "ok" for r in ref.results),
                      "concurrency": a.reference_concurrency,
                      "duration_s": round(ref.duration_s, 1)},
        "faults_run": {"failed": sum(r.status != "ok" for r in stormy.results),
                       "errors": [r.error for r in stormy.results if r.status != "ok"][:20],
                       "differing_outputs": len(differ), "differing_ids": differ[:20],
                       **_latency(stormy)},
        "faults": {"count": len(faults), **kinds,
                   "list": [[round(f.at_s, 1), f.action, f.node, round(f.down_s, 1)]
                            for f in faults]},
        "counters_reference": before, "counters_after_faults": after, "left_on_nodes": left,
    }


def _latency(run) -> dict:
    s = summarize(run.results, run.duration_s or 1e-9)
    keep = ("request_throughput_rps", "ttft_s", "tpot_s", "e2e_s")
    return {k: s[k] for k in keep if k in s} | {"duration_s": round(run.duration_s, 1)}


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(cluster: LocalCluster, t0: float) -> dict:
    """RSS (MB) and open fds of each process tree, and what each node holds."""
    procs = {}
    for name, proc in cluster.procs.items():
        rss = fds = 0
        for p in _tree(proc.pid):
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
            except psutil.NoSuchProcess:
                pass
        procs[name] = {"rss_mb": round(rss / 2**20, 1), "fds": fds}
    return {"t_s": round(time.monotonic() - t0, 1), "procs": procs,
            "nodes": node_holdings(cluster.http_url)}


def growth(samples: list[dict]) -> dict:
    """Per process: median RSS / fds of the first quarter vs the last quarter."""
    q = max(len(samples) // 4, 1)
    out = {}
    for name in samples[0]["procs"]:
        first = [s["procs"][name] for s in samples[:q] if name in s["procs"]]
        last = [s["procs"][name] for s in samples[-q:] if name in s["procs"]]
        out[name] = {f"{k}_{w}": statistics.median(x[k] for x in xs)
                     for k in ("rss_mb", "fds") for w, xs in (("first", first), ("last", last))}
        out[name]["rss_growth_mb"] = round(out[name]["rss_mb_last"] - out[name]["rss_mb_first"], 1)
        out[name]["max_rss_mb"] = max(s["procs"][name]["rss_mb"] for s in samples
                                      if name in s["procs"])
    return out


def run_soak(a: argparse.Namespace, out: Path) -> dict:
    n = int(a.rate * a.duration_s)
    requests = [r for r in shaped(a, n) if r.send_at_s <= a.duration_s]
    samples: list[dict] = []
    with LocalCluster(cluster_config(a, out / "logs-soak")) as cluster:
        cluster.start()
        target = TargetConfig(base_url=cluster.http_url, model=MODEL, timeout_s=600)
        replay(requests[:10], target, show_progress=False)          # warm-up
        done = threading.Event()
        t0 = time.monotonic()

        def sampler() -> None:
            while not done.wait(a.sample_s):
                samples.append(sample(cluster, t0))

        th = threading.Thread(target=sampler, daemon=True)
        samples.append(sample(cluster, t0))
        th.start()
        run = replay(requests, target, label="soak")
        done.set()
        th.join()
        left = leaks(cluster)
        samples.append(sample(cluster, t0))
    write_jsonl(run.results, out / "soak.jsonl")
    (out / "soak-samples.json").write_text(json.dumps(samples))
    blocks = [sum(v.get("disagg_node_kv_blocks_used", 0) for v in s["nodes"].values())
              for s in samples]
    return {"duration_s": a.duration_s, "rate_rps": a.rate, "requests": len(requests),
            "failed": sum(r.status != "ok" for r in run.results), **_latency(run),
            "samples": len(samples), "growth": growth(samples),
            "kv_blocks_used_max": max(blocks), "kv_blocks_used_end": blocks[-1],
            "left_on_nodes": left}


def _interrupt(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so leaving ``LocalCluster`` stops the deployment."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("trace", "soak"))
    p.add_argument("--out", default=str(ROOT / "results" / "faults"))
    p.add_argument("--requests", type=int, default=500, help="trace: requests replayed")
    p.add_argument("--duration-s", type=float, default=1800.0, help="soak: how long")
    p.add_argument("--sample-s", type=float, default=10.0, help="soak: sampling period")
    p.add_argument("--rate", type=float, default=1.0, help="offered requests/s")
    p.add_argument("--length-scale", type=float, default=0.25)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=48)
    p.add_argument("--mean-gap-s", type=float, default=8.0, help="trace: mean gap between faults")
    p.add_argument("--reference-concurrency", type=int, default=8,
                   help="trace: requests in flight while taking the no-fault reference")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("requests", "duration_s", "sample_s", "rate", "length_scale", "mean_gap_s",
                 "reference_concurrency"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    result = run_trace(a, out) if a.what == "trace" else run_soak(a, out)
    result["command"] = " ".join(["scripts/fault_run.py", *(argv or sys.argv[1:])])
    (out / f"{a.what}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    bad = result.get("failed") or result.get("faults_run", {}).get("failed") \
        or result.get("reference", {}).get("failed") \
        or result.get("faults_run", {}).get("differing_outputs") or result["left_on_nodes"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
