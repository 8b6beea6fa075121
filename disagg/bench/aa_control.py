"""A/A control: how far apart two identical deployments come out in one run, and
which differences between two different deployments are larger than that.

On a shared machine the same deployment measured twice does not give the same
figures: speed drifts over minutes, and a run at an overloaded rate amplifies
small differences into large queueing delays. A benchmark that compares two
deployments once cannot tell a real difference from that noise. So a benchmark
given a control starts one of its series a second time, with the very same
command, as a series of its own named ``NAME#2``, and measures it like any
other. Then, per metric::

    gap(r)   = max(r, 1 / r) - 1          how far a ratio is from 1, either way
    band     = the widest gap among the control's ratios (NAME#2 / NAME)
    verdict  = "level"  when gap(side / reference) <= band
               "ahead"  otherwise, when the side is the better one
               "behind" otherwise

Better is higher for throughputs and lower for latencies. Used by ``disagg bench
serve`` (:mod:`disagg.bench.serve_report`) and ``disagg experiment``
(:mod:`disagg.replay.mode_ratios`), which choose the ratios that make the band.
"""

from __future__ import annotations

from collections.abc import Iterable

CONTROL_SUFFIX = "#2"
"""A control series' name is its series' name and this: ``disagg-local#2``."""

def control_name(series: str) -> str:
    """The name of the control series that runs ``series`` a second time."""
    return series + CONTROL_SUFFIX


def is_control(name: str) -> bool:
    """Whether ``name`` is a control series' name."""
    return name.endswith(CONTROL_SUFFIX)


def series_of(name: str) -> str:
    """The series a name runs: ``disagg-local#2`` → ``disagg-local``; others unchanged."""
    return name.removesuffix(CONTROL_SUFFIX)


def gap(ratio: float) -> float:
    """How far a (positive) ratio is from 1, either way: 1.25 and 0.8 are both 0.25."""
    if not ratio > 0:
        raise ValueError(f"a ratio must be positive, got {ratio!r}")
    return max(ratio, 1 / ratio) - 1


def band(ratios: Iterable[float]) -> float | None:
    """The widest :func:`gap` among the control's ``ratios`` (3 decimals; ``None``
    when there are none)."""
    gaps = [gap(r) for r in ratios]
    return round(max(gaps), 3) if gaps else None


def verdict(ratio: float | None, noise: float | None, higher_is_better: bool) -> str | None:
    """``"level"`` when ``ratio`` (side / reference) is within the band ``noise``,
    else ``"ahead"`` or ``"behind"``; ``None`` without a ratio or a band."""
    if ratio is None or noise is None:
        return None
    if gap(ratio) <= noise + 1e-9:
        return "level"
    return "ahead" if (ratio > 1) == higher_is_better else "behind"
