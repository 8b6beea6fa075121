"""``disagg experiment``'s series against each other, rate by rate, judged against
an A/A control (:mod:`disagg.bench.aa_control`).

The pairs compared are the default deployment (``conditional``) against every
other series the experiment ran, and a control series (``MODE#2``: mode MODE
deployed a second time, with the very same configuration, after every other
series) against MODE. Per offered rate and pair, the ratio side / reference of::

    goodput              requests/s that met the SLO        higher is better
    slo_attainment       fraction of requests that met it   higher is better
    request_throughput   requests/s completed               higher is better
    ttft_p50, ttft_p99   time to first token                lower is better
    tpot_p50             time per output token              lower is better

(``None`` where either side has no figure or a zero). The control's band per
metric is the widest gap among its ratios over the rates; every other pair's
ratio is then ``ahead``, ``level`` or ``behind`` against that band. Each series
is measured once per rate, so the band holds one ratio per rate, and it includes
the machine's drift over the whole experiment (the control runs last). One second
deployment is one draw of the run-to-run spread, so the band is a lower bound of
it: a twin that happens to come out close gives a narrow band, and then a
difference no larger than other identical runs show is called ahead or behind
(measured on 2 cores: one run's goodput band was 0.1 %, another's 6.3 %).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from disagg.bench.aa_control import band, is_control, series_of, verdict
from disagg.replay.report import summary_figure

if TYPE_CHECKING:
    from disagg.replay.report_files import RunRecord

DEFAULT_SERIES = "conditional"

# name → (summary key, stat key or None, higher is better)
METRICS: dict[str, tuple[str, str | None, bool]] = {
    "goodput": ("goodput_rps", None, True),
    "slo_attainment": ("slo_attainment", None, True),
    "request_throughput": ("request_throughput_rps", None, True),
    "ttft_p50": ("ttft_s", "p50", False),
    "ttft_p99": ("ttft_s", "p99", False),
    "tpot_p50": ("tpot_s", "p50", False),
}


def pairs(series: list[str]) -> list[tuple[str, str]]:
    """(side, reference) pairs: the default series against every other one but the
    control, then the control against its series."""
    pairs = [(DEFAULT_SERIES, s) for s in series
             if DEFAULT_SERIES in series and s != DEFAULT_SERIES and not is_control(s)]
    return pairs + [(s, series_of(s)) for s in series if is_control(s)]


def mode_ratios(records: list[RunRecord]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per rate (``"0.2"``), ``"side/reference"`` → metric → side / reference, for
    the :func:`pairs` of the series in ``records``."""
    series = list(dict.fromkeys(r.series for r in records))
    by = {(r.series, r.rate): r.summary for r in records}
    out: dict[str, dict] = {}
    for rate in sorted({r.rate for r in records}):
        row = {f"{side}/{ref}": {name: _ratio(by.get((side, rate)), by.get((ref, rate)), name)
                                 for name in METRICS}
               for side, ref in pairs(series)}
        if row:
            out[f"{rate:g}"] = row
    return out


def control_band(table: dict[str, dict], control: str) -> dict:
    """The band of the ``control`` series (``MODE#2``) per metric: the widest gap
    among its ratios to MODE over every rate of ``table`` (:func:`mode_ratios`)."""
    own = f"{control}/{series_of(control)}"
    found = {name: [row[own][name] for row in table.values()
                    if own in row and row[own][name] is not None] for name in METRICS}
    return {"side": control, "of": series_of(control),
            "band": {name: band(values) for name, values in found.items()},
            "samples": max((len(v) for v in found.values()), default=0)}


def mode_verdicts(table: dict[str, dict], noise: dict) -> dict:
    """Per rate and pair of ``table`` but the control's own, per metric: ``ahead``,
    ``level`` or ``behind`` against the band of ``noise`` (:func:`control_band`)."""
    own = f"{noise['side']}/{noise['of']}"
    return {rate: {pair: {name: verdict(figures[name], noise["band"][name], METRICS[name][2])
                          for name in METRICS}
                   for pair, figures in row.items() if pair != own}
            for rate, row in table.items()}


def judge(records: list[RunRecord], control: str | None) -> tuple[dict, dict | None, dict | None]:
    """:func:`mode_ratios` of ``records``, and with a ``control`` series its
    :func:`control_band` and :func:`mode_verdicts` (else ``None`` for both)."""
    table = mode_ratios(records)
    noise = None if control is None else control_band(table, control)
    return table, noise, None if noise is None else mode_verdicts(table, noise)


def verdict_lines(noise: dict, judged: dict) -> list[str]:
    """Plain text: the control's band, then one line per rate and pair with its verdicts."""
    lines = [f"control band ({noise['side']} against {noise['of']}): {_widths(noise)}"]
    for rate, row in judged.items():
        for pair, marks in row.items():
            lines.append(f"{pair} @ {rate} req/s: "
                         + ", ".join(f"{name} {mark or 'n/a'}" for name, mark in marks.items()))
    return lines


def comparison_lines(table: dict[str, dict], noise: dict | None,
                     judged: dict | None) -> list[str]:
    """Markdown: per pair, a table of its ratios per rate (with the verdict after
    each where there is a control), then the control's band."""
    lines: list[str] = []
    names = list(METRICS)
    for pair in dict.fromkeys(p for row in table.values() for p in row):
        lines += [f"**{pair}**\n", "| rate (req/s) | " + " | ".join(names) + " |",
                  "| ---: | " + " | ".join("---:" for _ in names) + " |"]
        for rate, row in table.items():
            if pair not in row:
                continue
            marks = (judged or {}).get(rate, {}).get(pair, {})
            cells = [_cell(row[pair][n], marks.get(n)) for n in names]
            lines.append(f"| {rate} | " + " | ".join(cells) + " |")
        lines.append("")
    if noise is not None:
        lines.append(f"Control band ({noise['side']} against {noise['of']}, {noise['samples']} "
                     f"rates): {_widths(noise)}. A ratio within its metric's band is level. The band "
                     "is one second deployment's spread, a lower bound of the run-to-run "
                     "spread: a verdict near its edge may not hold in another run.\n")
    return lines


def _cell(ratio: float | None, mark: str | None) -> str:
    if ratio is None:
        return "n/a"
    return f"{ratio:.3f}" + (f" ({mark})" if mark else "")


def _widths(noise: dict) -> str:
    """The control's band per metric as text: ``goodput 0.1 %, ...``."""
    return ", ".join(f"{name} {'n/a' if width is None else f'{100 * width:.1f} %'}"
                     for name, width in noise["band"].items())


def _ratio(mine: dict | None, theirs: dict | None, name: str) -> float | None:
    if not mine or not theirs:
        return None
    key, stat, _ = METRICS[name]
    a, b = (summary_figure(s, key, stat) for s in (mine, theirs))
    return None if not a or not b else round(a / b, 3)
