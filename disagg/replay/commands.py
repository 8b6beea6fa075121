"""``disagg replay``: replay a trace against any OpenAI-compatible endpoint.

    disagg replay --trace traces/AzureLLMInferenceTrace_conv.csv \\
        --base-url http://127.0.0.1:8000 --start-s 600 --max-requests 40 \\
        --length-scale 0.25 --max-output-tokens 64 --rates 0.25,0.5 --out results/my-run

The trace is shaped (window, rate, lengths; see ``shaping``), sent open-loop
once per ``--rates`` entry (or once at the trace's own pace times
``--speedup``), and the report folder written (see ``report_files``). The
shaping and SLO flags are shared with ``disagg experiment``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

from disagg.replay.loadgen import ReplayRun, TargetConfig, replay
from disagg.replay.report import summarize
from disagg.replay.report_files import RunRecord, write_report
from disagg.replay.server_metrics import scrape, server_delta
from disagg.replay.shaping import ShapeConfig, ShapedRequest, mean_rate, shape
from disagg.replay.traces import READERS, read_trace


def parse_rates(text: str | None) -> list[float] | None:
    """``"0.25,0.5,1"`` → ``[0.25, 0.5, 1.0]`` (ascending, positive, distinct)."""
    if text is None:
        return None
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or any(not r > 0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"--rates needs distinct positive rates, got {text!r}")
    return sorted(rates)


DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "traces" / "AzureLLMInferenceTrace_conv.csv"
"""The Azure conversation trace shipped in ``traces/``."""

EXPERIMENT_SHAPING = {
    "trace": str(DEFAULT_TRACE), "start_s": 600.0, "max_requests": 40,
    "length_scale": 0.25, "max_input_tokens": 512, "max_output_tokens": 64,
    "rates": "0.2,0.4,0.6,0.8", "ttft_slo_ms": 2000.0, "tpot_slo_ms": 200.0}
"""``disagg experiment``'s trace window, shaping and SLO defaults (``disagg plan``'s too,
so a plan and an experiment run with defaults describe the same workload)."""


def add_shaping_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Trace, window, rate, length and SLO flags (``defaults`` overrides the defaults)."""
    d = {"trace": None, "start_s": 0.0, "duration_s": None, "max_requests": None,
         "length_scale": 1.0, "max_input_tokens": None, "max_output_tokens": None,
         "rates": None, "ttft_slo_ms": None, "tpot_slo_ms": None, **(defaults or {})}
    g = p.add_argument_group("trace and shaping")
    g.add_argument("--trace", required=d["trace"] is None, default=d["trace"],
                   help="trace file: Mooncake JSONL or Azure CSV"
                        + (f" (default {d['trace']})" if d["trace"] else ""))
    g.add_argument("--format", default="auto", choices=["auto", *READERS],
                   help="trace format (default: from the file)")
    g.add_argument("--start-s", type=float, default=d["start_s"],
                   help="window start, seconds of trace time")
    g.add_argument("--duration-s", type=float, default=d["duration_s"],
                   help="window length, seconds of trace time")
    g.add_argument("--max-requests", type=int, default=d["max_requests"],
                   help="at most this many requests from the window")
    g.add_argument("--speedup", type=float, default=1.0,
                   help="divide the trace's gaps by this (ignored with --rates)")
    g.add_argument("--rates", default=d["rates"],
                   help="comma-separated mean request rates (req/s); one run per rate, the "
                        "trace's arrival pattern rescaled to each")
    g.add_argument("--length-scale", type=float, default=d["length_scale"],
                   help="multiply prompt and output lengths (and the prefix block size)")
    g.add_argument("--max-input-tokens", type=int, default=d["max_input_tokens"])
    g.add_argument("--max-output-tokens", type=int, default=d["max_output_tokens"])
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output must fit (default: the model's context)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="draw prompt ids below this (default: from --tokenizer-model)")
    g.add_argument("--tokenizer-model", default="default",
                   help="model whose config gives the vocabulary and context "
                        "('default' = the embedded SmolLM2)")
    g.add_argument("--seed", type=int, default=0, help="changes every prompt token, not the "
                                                       "prefix structure")
    s = p.add_argument_group("SLO (for attainment and goodput)")
    s.add_argument("--ttft-slo-ms", type=float, default=d["ttft_slo_ms"],
                   help="time-to-first-token bound")
    s.add_argument("--tpot-slo-ms", type=float, default=d["tpot_slo_ms"],
                   help="time-per-output-token bound")
    s.add_argument("--attainment-target", type=float, default=0.9,
                   help="the sweep's bar: highest rate with at least this SLO attainment")


def model_limits(model: str) -> tuple[int, int]:
    """``(vocab_size, max_position_embeddings)`` from a model's ``config.json``."""
    from disagg.model.config import ModelConfig
    from disagg.model.resolve import resolve_model_dir
    cfg = ModelConfig.from_dir(resolve_model_dir(model))
    return cfg.vocab_size, cfg.max_position_embeddings


def shape_runs(a: argparse.Namespace) -> list[tuple[float | None, list[ShapedRequest]]]:
    """Read and shape the trace once per rate: ``[(rate or None, requests)]``.

    Each rate gets its own seed (``seed + i``) so a server that keeps its
    prefix cache between runs does not see the previous run's prompts again;
    the prefix structure is the same in every run.
    """
    vocab, context = a.vocab_size, a.max_model_len
    if vocab is None or context is None:
        model_vocab, model_context = model_limits(a.tokenizer_model)
        vocab, context = vocab or model_vocab, context or model_context
    records = read_trace(a.trace, a.format)
    common = dict(vocab_size=vocab, start_s=a.start_s, duration_s=a.duration_s,
                  max_requests=a.max_requests, length_scale=a.length_scale,
                  max_input_tokens=a.max_input_tokens, max_output_tokens=a.max_output_tokens,
                  max_model_len=context)
    rates = parse_rates(a.rates)
    if rates is None:
        return [(None, shape(records, ShapeConfig(speedup=a.speedup, seed=a.seed, **common)))]
    return [(rate, shape(records, ShapeConfig(target_rate=rate, seed=a.seed + i, **common)))
            for i, rate in enumerate(rates)]


def slo_bounds(a: argparse.Namespace) -> tuple[float | None, float | None]:
    """The SLO flags in seconds."""
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = getattr(a, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 < a.attainment_target <= 1:
        raise ValueError(f"--attainment-target must be in (0, 1], got {a.attainment_target}")
    return (None if a.ttft_slo_ms is None else a.ttft_slo_ms / 1000,
            None if a.tpot_slo_ms is None else a.tpot_slo_ms / 1000)


def offered_rate(requests: list[ShapedRequest], rate: float | None) -> float:
    """The run's offered mean rate (the target, or measured from the schedule)."""
    if rate is not None:
        return rate
    times = sorted(r.send_at_s for r in requests)
    return mean_rate(times) if len(times) > 1 and times[-1] > times[0] else 0.0


def run_one(requests: list[ShapedRequest], target: TargetConfig, series: str, rate: float,
            slo: tuple[float | None, float | None]) -> RunRecord:
    """Replay once, scrape the server's counters around it, summarize."""
    before = scrape(target.base_url, target.headers)
    run: ReplayRun = replay(requests, target, label=f"{series} @ {rate:g} req/s")
    after = scrape(target.base_url, target.headers)
    summary = summarize(run.results, run.duration_s if run.duration_s > 0 else 1e-9, *slo)
    summary.update(offered_rate_rps=rate, max_send_lag_s=run.max_send_lag_s,
                   interrupted=run.interrupted, unsent=run.unsent, cancelled=run.cancelled)
    server = server_delta(before, after)
    if server is not None:
        summary["server"] = server
    return RunRecord(series, rate, run, summary)


def served_model(base_url: str, headers: dict[str, str]) -> str:
    """The first model the endpoint lists at ``/v1/models``."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(f"cannot list models at {base_url}/v1/models ({exc}); "
                           "pass --model NAME") from None


def add_replay_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``disagg replay``."""
    p.add_argument("--base-url", required=True,
                   help="the OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first "
                                                 "one /v1/models lists)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (outputs may end before max_tokens)")
    p.add_argument("--label", default="replay", help="the run's name in the report")
    p.add_argument("--out", default="replay-results", help="report folder")
    add_shaping_args(p)


def run_replay_command(a: argparse.Namespace) -> int:
    """``disagg replay``: shape, send, report. Exit 0, or 130 when interrupted."""
    slo = slo_bounds(a)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    model = a.model or served_model(a.base_url, headers)
    target = TargetConfig(base_url=a.base_url, model=model, api_key=a.api_key,
                          timeout_s=a.timeout_s, ignore_eos=not a.no_ignore_eos)
    records: list[RunRecord] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for rate, requests in shape_runs(a):
        rec = run_one(requests, target, a.label, offered_rate(requests, rate), slo)
        records.append(rec)
        if rec.run.interrupted:
            print("interrupted: writing what was collected", file=sys.stderr)
            break
    meta = {"command": " ".join(["disagg", *sys.argv[1:]]), "started": started,
            "base_url": a.base_url, "model": model, "trace": str(a.trace)}
    out = write_report(a.out, records, meta, a.attainment_target, title="Replay report")
    print(f"report written to {out}/ (report.md, summary.json, plots, results/)",
          file=sys.stderr)
    print(json.dumps({r.name: {k: r.summary[k] for k in ("num_requests", "num_errors",
                                                          "slo_attainment", "goodput_rps")}
                      for r in records}))
    return 130 if any(r.run.interrupted for r in records) else 0
