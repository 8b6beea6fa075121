"""Prometheus metric types without a client library: counters, gauges, histograms.

A metric with ``labelnames`` is a family: ``.labels(route="local")`` returns
(and creates on first use) the child that holds the numbers; a metric
without labels is used directly (``c.inc()``). Each metric has one lock,
shared by its children, so updates from the asyncio loop and from worker
threads are safe. :class:`Registry` renders text format 0.0.4 for
``/metrics`` (send it with ``CONTENT_TYPE``). Everything here is
re-exported by :mod:`router.metrics`, which adds the system's metrics.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Iterable

from router.prom_text import (
    check_label_name, check_metric_name, escape_help, format_sample, format_value)


class _Child:
    """The numbers behind one label combination; guarded by its metric's lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0

    @property
    def value(self) -> float:
        """The current value."""
        with self._lock:
            return self._value


class CounterChild(_Child):
    """A monotonically increasing number."""

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0; a counter never goes down)."""
        if not amount >= 0:
            raise ValueError(f"a counter can only increase; got inc({amount!r})")
        with self._lock:
            self._value += amount


class GaugeChild(_Child):
    """A number that goes up and down."""

    def set(self, value: float) -> None:
        """Replace the value."""
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        with self._lock:
            self._value -= amount


class HistogramChild:
    """Observation counts per bucket (non-cumulative inside, cumulative when rendered)."""

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds                      # ascending, last is +inf
        self._counts = [0] * len(bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation; it lands in the first bucket with ``value <= le``."""
        if math.isnan(value):
            raise ValueError("cannot observe NaN")
        i = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(le, cumulative count), ...], sum, count)``, taken atomically."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for le, n in zip(self._bounds, counts):
            running += n
            cumulative.append((le, running))
        return cumulative, total, running


class _Metric:
    """A metric family: name, help, label names and one child per label values."""

    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.name = check_metric_name(name)
        if not isinstance(help, str):
            raise ValueError(f"help of {name} must be a string, got {help!r}")
        self.help = help
        self.labelnames = tuple(check_label_name(n) for n in labelnames)
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"duplicate label names for {name}: {self.labelnames}")
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, **labelvalues: str) -> Any:
        """The child for these label values (all label names, string values)."""
        if set(labelvalues) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, "
                             f"got {tuple(sorted(labelvalues))}")
        for k, v in labelvalues.items():
            if not isinstance(v, str):
                raise ValueError(f"label {k} of {self.name} must be a str, got {v!r}")
        key = tuple(labelvalues[n] for n in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def _only_child(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...)")
        return self._children[()]

    def sample_names(self) -> tuple[str, ...]:
        """Every sample name this metric writes (histograms add suffixes)."""
        return (self.name,)

    def render(self) -> list[str]:
        """``# HELP``, ``# TYPE`` and one line per sample, children in label order."""
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            children = sorted(self._children.items())
        for key, child in children:
            lines.extend(self._render_child(dict(zip(self.labelnames, key)), child))
        return lines

    def _render_child(self, labels: dict[str, str], child: Any) -> list[str]:
        return [format_sample(self.name, labels, child.value)]


class Counter(_Metric):
    """A counter family; ``inc`` / ``value`` work directly when it has no labels."""

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild(self._lock)

    def inc(self, amount: float = 1.0) -> None:
        """Increment the unlabelled counter."""
        self._only_child().inc(amount)

    @property
    def value(self) -> float:
        """The unlabelled counter's value."""
        return self._only_child().value


class Gauge(_Metric):
    """A gauge family; ``set`` / ``inc`` / ``dec`` work directly when it has no labels."""

    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild(self._lock)

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._only_child().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Raise the unlabelled gauge."""
        self._only_child().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Lower the unlabelled gauge."""
        self._only_child().dec(amount)

    @property
    def value(self) -> float:
        """The unlabelled gauge's value."""
        return self._only_child().value


class Histogram(_Metric):
    """A histogram family with fixed upper bounds (``+Inf`` is added for you)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float],
                 labelnames: Iterable[str] = ()) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()
        if not bounds or any(not math.isfinite(b) for b in bounds) or any(
                a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"buckets of {name} must be finite and strictly increasing, "
                             f"got {bounds}")
        if "le" in tuple(labelnames):
            raise ValueError(f"'le' is reserved for histogram buckets ({name})")
        self.buckets = (*bounds, math.inf)
        super().__init__(name, help, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._lock, self.buckets)

    def observe(self, value: float) -> None:
        """Observe into the unlabelled histogram."""
        self._only_child().observe(value)

    def sample_names(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))

    def _render_child(self, labels: dict[str, str], child: HistogramChild) -> list[str]:
        cumulative, total, count = child.snapshot()
        lines = [format_sample(self.name + "_bucket", {**labels, "le": format_value(le)}, n)
                 for le, n in cumulative]
        lines.append(format_sample(self.name + "_sum", labels, total))
        lines.append(format_sample(self.name + "_count", labels, count))
        return lines


class Registry:
    """An ordered set of metrics that renders one ``/metrics`` page."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: list[_Metric] = []
        self._names: set[str] = set()

    def register(self, metric: _Metric) -> _Metric:
        """Add ``metric`` (returned, for chaining); clashing sample names raise ValueError."""
        names = {metric.name, *metric.sample_names()}
        with self._lock:
            clash = names & self._names
            if clash:
                raise ValueError(f"metric name(s) already registered: {sorted(clash)}")
            self._names |= names
            self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """The whole page in text format 0.0.4 (ends with a newline)."""
        with self._lock:
            metrics = list(self._metrics)
        lines = [line for m in metrics for line in m.render()]
        return "\n".join(lines) + "\n" if lines else ""
