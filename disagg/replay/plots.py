"""PNG plots of replay runs (matplotlib, no display needed).

- ``latency_cdfs``: one panel per offered rate, one CDF curve per series
  (e.g. colocated / disaggregated / conditional), for TTFT or TPOT, with the
  SLO bound as a dashed line;
- ``goodput_vs_rate``: goodput (req/s meeting both SLOs) and SLO attainment
  against the offered request rate, one line per series, the attainment
  target as a dashed line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def _cdf(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and their empirical cumulative fractions."""
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, len(x) + 1) / len(x)


def latency_cdfs(panels: dict[float, dict[str, list[float]]], path: str | Path, what: str,
                 slo_s: float | None = None) -> None:
    """Write a CDF figure: ``panels[rate][series]`` are latencies in seconds
    (plotted in ms); ``what`` names the metric (``"TTFT"``, ``"TPOT"``)."""
    if not panels:
        raise ValueError("latency_cdfs needs at least one panel")
    rates = sorted(panels)
    fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 3.4), squeeze=False,
                             sharey=True)
    for ax, rate in zip(axes[0], rates):
        for series, values in panels[rate].items():
            if values:
                x, y = _cdf(values)
                ax.step(x * 1000, y, where="post", label=f"{series} (n={len(values)})")
        if slo_s is not None:
            ax.axvline(slo_s * 1000, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_title(f"{rate:g} req/s")
        ax.set_xlabel(f"{what} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("fraction of requests")
    fig.suptitle(f"{what} CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goodput_vs_rate(series: dict[str, list[tuple[float, float, float]]], path: str | Path,
                    attainment_target: float = 0.9) -> None:
    """Write goodput and SLO attainment against offered rate; ``series[name]`` is a
    list of ``(rate, goodput_rps, attainment)``."""
    if not series:
        raise ValueError("goodput_vs_rate needs at least one series")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, points in series.items():
        pts = sorted(points)
        rates = [p[0] for p in pts]
        left.plot(rates, [p[1] for p in pts], marker="o", label=name)
        right.plot(rates, [100 * p[2] for p in pts], marker="o", label=name)
    lo = min(p[0] for pts in series.values() for p in pts)
    hi = max(p[0] for pts in series.values() for p in pts)
    left.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label="offered")
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("goodput (req/s within SLO)")
    left.set_ylim(bottom=0)
    right.axhline(100 * attainment_target, color="grey", linestyle="--", linewidth=1,
                  label=f"{100 * attainment_target:g} % target")
    right.set_xlabel("offered rate (req/s)")
    right.set_ylabel("SLO attainment (%)")
    right.set_ylim(0, 105)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
