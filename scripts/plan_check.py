"""Check ``disagg plan``'s recommendation against ``disagg experiment`` on this machine.

    .venv/bin/python scripts/plan_check.py --out results/plan-check

1. **Calibrate** the node shapes the machine can run, each by a short replay through a
   real ``disagg serve`` whose router then holds calibrated cost-model fits:
   ``split`` (prefill node on core 0, decode node on core 1, every prefill remote: the
   prefill-node and KV-link fits), ``colocated-1`` and ``colocated-2`` (the decode node
   on core 0, or on cores 0-1, every prefill local: that decode shape's step and local
   prefill fits). ``disagg plan --from-metrics`` saves each one's profile and the three
   are merged into one, so no shape is extrapolated.
2. **Plan** with that profile for the trace and SLOs ``disagg experiment`` uses by
   default, TP 1, 1 or 2 cores per rank, at most 2 cores: every candidate's simulated
   goodput and attainment at the experiment's rates.
3. **Run** the candidates that exist here with ``disagg experiment``: colocated and
   disaggregated (1P+1D) on cores 0-1, colocated on core 0 alone.
4. **Compare**: each deployment's measured highest rate at the attainment target (the
   experiment's ``best_rate``) against the planner's goodput, and whether the planner's
   pick is the best split measured. Written to ``OUT/check.json`` and printed.

Needs the machine to itself (about 40 minutes on 2 cores); every step's command and
log lands in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from disagg.bench.server_process import Server, free_port  # noqa: E402
from disagg.replay.commands import EXPERIMENT_SHAPING  # noqa: E402

DISAGG = str(Path(sys.executable).with_name("disagg"))

CALIBRATIONS = {
    # name: (disagg serve flags, the decode shape its fits stand for)
    "split": (["--policy", "remote", "--prefill-cpus", "0", "--decode-cpus", "1"], "1x1"),
    "colocated-1": (["--policy", "local", "--prefill-cpus", "1", "--decode-cpus", "0"], "1x1"),
    "colocated-2": (["--policy", "local", "--prefill-cpus", "0-1", "--decode-cpus", "0-1"],
                    "1x2"),
}
"""Each ``disagg serve`` layout calibrated. With ``--policy local`` the prefill node idles."""

EXPERIMENTS = {
    # name: (cores, modes) — the planner's candidate each mode stands for is in LABELS
    "two-cores": ("0-1", "colocated,disaggregated"),
    "one-core": ("0", "colocated"),
}

LABELS = {
    ("two-cores", "colocated"): "colocated 1D tp1x2",
    ("two-cores", "disaggregated"): "1P tp1 + 1D tp1",
    ("one-core", "colocated"): "colocated 1D tp1",
}
"""Which planner row each experiment series is (``PlanRow.label`` format, checked below)."""


def _say(msg: str) -> None:
    print(f"[plan-check] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log: Path) -> str:
    """Run a command (its stderr to ``log``), fail loudly; its stdout."""
    _say("$ " + shlex.join(cmd))
    with log.open("w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    if done.returncode not in (0, 1):     # disagg plan exits 1 when nothing reaches the target
        raise RuntimeError(f"{cmd[1:3]} exited {done.returncode}; see {log}")
    return done.stdout


def _shaping() -> list[str]:
    """The experiment's default trace window and SLOs, as flags both commands take."""
    s = EXPERIMENT_SHAPING
    return ["--trace", s["trace"], "--start-s", str(s["start_s"]),
            "--max-requests", str(s["max_requests"]), "--length-scale", str(s["length_scale"]),
            "--max-input-tokens", str(s["max_input_tokens"]),
            "--max-output-tokens", str(s["max_output_tokens"]),
            "--ttft-slo-ms", str(s["ttft_slo_ms"]), "--tpot-slo-ms", str(s["tpot_slo_ms"])]


def calibrate(a: argparse.Namespace, name: str) -> Path:
    """Serve one layout, replay the calibration load through it, save its profile."""
    flags, shape = CALIBRATIONS[name]
    out = a.out / "calibration" / name
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Server(name, [DISAGG, "serve", "--port", str(port), *flags], {}, port,
                    out / "serve.log")
    try:
        server.start(timeout_s=600)
        _run([DISAGG, "replay", "--base-url", server.url, "--out", str(out / "replay"),
              "--rates", a.calibration_rate, *_shaping()], out / "replay.log")
        profile = out / "profile.json"
        _run([DISAGG, "plan", "--from-metrics", server.url, "--unit", "core",
              "--metrics-prefill-shape", "1x1", "--metrics-decode-shape", shape,
              "--save-profile", str(profile), "--target-rate", str(a.target_rate),
              "--max-compute", "2", "--no-progress", "--json", *_shaping()],
             out / "plan.log")
    finally:
        server.stop()
    return profile


def merged_profile(profiles: dict[str, Path], out: Path) -> Path:
    """Prefill node and KV link from ``split``; each decode shape from its colocated run."""
    merged = json.loads(profiles["split"].read_text())
    merged["decode"] = [json.loads(profiles[name].read_text())["decode"][0]
                        for name in ("colocated-1", "colocated-2")]
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "results" / "plan-check")
    p.add_argument("--rates", default=EXPERIMENT_SHAPING["rates"],
                   help="experiment rates, req/s (default: disagg experiment's)")
    p.add_argument("--calibration-rate", default="0.4",
                   help="rate of each calibration replay, req/s")
    p.add_argument("--target-rate", type=float, default=0.6,
                   help="the goodput the plan must reach, req/s")
    p.add_argument("--reuse-calibration", action="store_true",
                   help="plan from the profiles an earlier run saved in OUT/calibration")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    profiles = {name: (a.out / "calibration" / name / "profile.json" if a.reuse_calibration
                       else calibrate(a, name)) for name in CALIBRATIONS}
    profile = merged_profile(profiles, a.out / "profile.json")
    plan = json.loads(_run([DISAGG, "plan", "--profile", str(profile), "--tp", "1",
                            "--units-per-rank", "1,2", "--max-compute", "2",
                            "--target-rate", str(a.target_rate), "--rates", a.rates,
                            "--no-progress", "--json", *_shaping()], a.out / "plan.log"))
    (a.out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")

    measured = {}
    for name, (cpus, modes) in EXPERIMENTS.items():
        folder = a.out / f"experiment-{name}"
        _run([DISAGG, "experiment", "--modes", modes, "--cpus", cpus, "--rates", a.rates,
              "--out", str(folder), *_shaping()], a.out / f"experiment-{name}.log")
        summary = json.loads((folder / "summary.json").read_text())
        for mode, best in summary["best_rate"].items():
            measured[LABELS[(name, mode)]] = {
                "best_rate_rps": best,
                "attainment_at": {f"{r['rate']:g}": r["summary"]["slo_attainment"]
                                  for r in summary["runs"] if r["series"] == mode}}

    rows = {r["label"]: r for r in plan["configs"]}
    missing = set(measured) - set(rows)
    if missing:
        raise RuntimeError(f"no planner row for {sorted(missing)}; rows: {sorted(rows)}")
    table = [{"deployment": label, "compute": rows[label]["compute"],
              "planned_goodput_rps": rows[label]["goodput_rps"],
              "planned_attainment_at": rows[label]["attainment_at"],
              "measured_best_rate_rps": m["best_rate_rps"],
              "measured_attainment_at": m["attainment_at"]}
             for label, m in measured.items()]
    pick = plan["recommended"]
    best = max((m["best_rate_rps"] or 0.0) for m in measured.values())
    check = {"target_rate_rps": a.target_rate, "rates": a.rates,
             "recommended": None if pick is None else pick["label"],
             "measured_best": sorted(l for l, m in measured.items()
                                     if (m["best_rate_rps"] or 0.0) == best),
             "deployments": table, "wall_time_s": round(time.monotonic() - t0, 1)}
    check["recommended_is_best_measured"] = check["recommended"] in check["measured_best"]
    (a.out / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(json.dumps(check, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
