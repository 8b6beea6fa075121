"""Write a replay's or an experiment's report folder.

One layout for both ``disagg replay`` (one series, one or more rates) and
``disagg experiment`` (one series per serving mode)::

    OUT/
      results/SERIES@RATE.jsonl   every request of that run (raw, RequestResult)
      summary.json                meta + every run's summary + the rate sweep
      report.md                   per rate a side-by-side table; the sweep table; with
                                  a peer series, each series' best rate against the peer's;
                                  the default series' ratios to the others per rate, judged
                                  against a control series where there is one
                                  (:mod:`disagg.replay.mode_ratios`)
      ttft_cdf.png  tpot_cdf.png  CDFs, one panel per rate, one curve per series
      goodput_vs_rate.png         goodput and SLO attainment against offered rate
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from disagg.replay.loadgen import ReplayRun
from disagg.replay.mode_ratios import comparison_lines, judge
from disagg.replay.report import markdown_table, write_jsonl, write_summary_json

FILES = ("summary.json", "report.md", "ttft_cdf.png", "tpot_cdf.png", "goodput_vs_rate.png")


@dataclass
class RunRecord:
    """One replay: its series (serving mode or label), offered rate, data, summary."""

    series: str
    rate: float
    run: ReplayRun
    summary: dict

    @property
    def name(self) -> str:
        """``series@rate``, the run's file stem."""
        return f"{self.series}@{self.rate:g}"


def best_rates(records: list[RunRecord], target: float) -> dict[str, float | None]:
    """Per series, the highest offered rate whose SLO attainment is >= ``target``
    (None when no rate reached it)."""
    best: dict[str, float | None] = {}
    for rec in records:
        best.setdefault(rec.series, None)
        att = rec.summary.get("slo_attainment")
        if att is not None and att >= target and (best[rec.series] is None
                                                  or rec.rate > best[rec.series]):
            best[rec.series] = rec.rate
    return best


def sweep_table(records: list[RunRecord], target: float) -> str:
    """Markdown: goodput / attainment per series and rate, and each series' best rate."""
    series = list(dict.fromkeys(r.series for r in records))
    rates = sorted({r.rate for r in records})
    by = {(r.series, r.rate): r.summary for r in records}
    best = best_rates(records, target)
    lines = ["| offered rate (req/s) | " + " | ".join(series) + " |",
             "| ---: | " + " | ".join("---:" for _ in series) + " |"]
    for rate in rates:
        cells = []
        for s in series:
            summ = by.get((s, rate))
            cells.append("n/a" if summ is None else
                         f"{summ['goodput_rps']:.2f} req/s ({100 * summ['slo_attainment']:.0f} %)")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines.append(f"| **highest rate with ≥ {100 * target:g} % SLO** | "
                 + " | ".join("none" if best[s] is None else f"**{best[s]:g}**" for s in series)
                 + " |")
    return "\n".join(lines) + "\n"


def peer_comparison(records: list[RunRecord], target: float, peer: str) -> dict[str, dict]:
    """Per series other than ``peer``: its highest rate with >= ``target`` SLO
    attainment, the peer's, and the verdict ``"higher"``, ``"lower"``, ``"equal"``
    or ``"neither"`` (neither reached the target at any rate)."""
    best = best_rates(records, target)
    if peer not in best:
        raise ValueError(f"no run of the peer series {peer!r}")
    theirs = best[peer]
    out = {}
    for series, mine in best.items():
        if series == peer:
            continue
        if mine is None and theirs is None:
            verdict = "neither"
        elif theirs is None or (mine is not None and mine > theirs):
            verdict = "higher"
        elif mine is None or mine < theirs:
            verdict = "lower"
        else:
            verdict = "equal"
        out[series] = {"best_rate": mine, "peer_best_rate": theirs, "verdict": verdict}
    return out


def peer_lines(comparison: dict[str, dict], peer: str, target: float) -> list[str]:
    """``peer_comparison`` as Markdown bullets, one per series."""
    def rate(r: float | None) -> str:
        return "none" if r is None else f"{r:g} req/s"
    words = {"higher": f"higher than {peer}", "lower": f"lower than {peer}",
             "equal": f"equal to {peer}", "neither": f"neither reaches {100 * target:g} %"}
    return [f"- **{s}**: {rate(c['best_rate'])} vs {peer} {rate(c['peer_best_rate'])} "
            f"({words[c['verdict']]})" for s, c in comparison.items()]


def write_report(out_dir: str | Path, records: list[RunRecord], meta: dict,
                 attainment_target: float = 0.9, title: str = "Replay report",
                 peer: str | None = None, control: str | None = None) -> Path:
    """Write every file of the layout above; returns ``out_dir``. ``peer`` names the
    series every other one is set against (its highest rate at the attainment target);
    ``control`` the control series (``MODE#2``) whose band judges the ratios."""
    from disagg.replay.plots import goodput_vs_rate, latency_cdfs   # matplotlib: slow import
    if not records:
        raise ValueError("write_report needs at least one run")
    out = Path(out_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    for rec in records:
        write_jsonl(rec.run.results, out / "results" / f"{rec.name}.jsonl")
    rates = sorted({r.rate for r in records})
    vs_peer = None if peer is None else peer_comparison(records, attainment_target, peer)
    table, noise, judged = judge(records, control)
    write_summary_json({
        "meta": meta,
        "attainment_target": attainment_target,
        "best_rate": best_rates(records, attainment_target),
        "peer": peer, "vs_peer": vs_peer,
        "ratios": table, "control": noise, "verdicts": judged,
        "runs": [{"series": r.series, "rate": r.rate, "summary": r.summary} for r in records],
    }, out / "summary.json")

    ttft_slo, tpot_slo = records[0].summary.get("ttft_slo_s"), records[0].summary.get("tpot_slo_s")
    md = [f"# {title}\n", "```json\n" + json.dumps(meta, indent=2) + "\n```\n"]
    for rate in rates:
        at_rate = {r.series: r.summary for r in records if r.rate == rate}
        md += [f"## Offered rate {rate:g} req/s\n", markdown_table(at_rate)]
    md += ["## Goodput and SLO attainment against rate\n",
           f"SLO: TTFT ≤ {_ms(ttft_slo)}, TPOT ≤ {_ms(tpot_slo)}; goodput = requests/s meeting "
           f"both; attainment target {100 * attainment_target:g} %.\n",
           sweep_table(records, attainment_target)]
    if vs_peer:
        md += [f"### Against the peer ({peer})\n",
               f"Highest offered rate with ≥ {100 * attainment_target:g} % SLO attainment, "
               f"each series against {peer} (rates tried: "
               f"{', '.join(f'{r:g}' for r in rates)} req/s):\n",
               "\n".join(peer_lines(vs_peer, peer, attainment_target)) + "\n"]
    if table:
        md += ["## Series against each other\n",
               "Each pair's ratio side / reference at every offered rate (throughputs and "
               "goodput: higher is better; latencies: lower is better)"
               + (f"; each judged against the control series {control}: ahead, level "
                  "(within the difference between two identical deployments) or behind."
                  if noise else ".") + "\n",
               *comparison_lines(table, noise, judged)]
    md += ["![TTFT CDF](ttft_cdf.png)\n", "![TPOT CDF](tpot_cdf.png)\n",
           "![goodput against rate](goodput_vs_rate.png)\n"]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    for what, attr, slo in (("TTFT", "ttft", ttft_slo), ("TPOT", "tpot", tpot_slo)):
        panels = {rate: {r.series: [getattr(x, attr) for x in r.run.results
                                    if x.status == "ok" and getattr(x, attr) is not None]
                         for r in records if r.rate == rate} for rate in rates}
        latency_cdfs(panels, out / f"{what.lower()}_cdf.png", what, slo)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in records:
        series.setdefault(r.series, []).append(
            (r.rate, r.summary["goodput_rps"], r.summary["slo_attainment"] or 0.0))
    goodput_vs_rate(series, out / "goodput_vs_rate.png", attainment_target)
    return out


def _ms(seconds: float | None) -> str:
    return "unbounded" if seconds is None else f"{seconds * 1000:g} ms"
