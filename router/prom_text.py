"""Prometheus text exposition format 0.0.4: names, escaping, numbers, parsing.

The writer side (:func:`format_sample` and friends) is used by
:mod:`router.metrics`; :func:`parse_prometheus_text` reads a ``/metrics``
page back (tests, the trace-replay tool). Re-exported by :mod:`router.metrics`.
"""

from __future__ import annotations

import math
import re

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` a ``/metrics`` endpoint should send."""

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Sample = tuple[str, frozenset, float]
"""``(metric name, frozenset of (label, value) pairs, value)``."""


def check_metric_name(name: str) -> str:
    """Return ``name`` or raise ValueError unless it matches ``[a-zA-Z_:][a-zA-Z0-9_:]*``."""
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")
    return name


def check_label_name(name: str) -> str:
    """Return ``name`` or raise ValueError (``[a-zA-Z_][a-zA-Z0-9_]*``, no ``__`` prefix)."""
    if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
        raise ValueError(f"invalid label name {name!r}: must match [a-zA-Z_][a-zA-Z0-9_]* "
                         f"and not start with '__'")
    return name


def escape_help(text: str) -> str:
    """Escape ``\\`` and newline for a ``# HELP`` line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(value: str) -> str:
    """Escape ``\\``, ``"`` and newline for a label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value or ``le`` bound: ``+Inf``, ``-Inf``, ``NaN`` or a float literal."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def format_sample(name: str, labels: dict[str, str], value: float) -> str:
    """One exposition line: ``name{a="x",b="y"} value``."""
    if not labels:
        return f"{name} {format_value(value)}"
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {format_value(value)}"


def _parse_value(text: str, lineno: int) -> float:
    special = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"line {lineno}: bad sample value {text!r}") from None


def _parse_labels(line: str, pos: int, lineno: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",...}`` starting at ``line[pos] == "{"``; return labels, end index."""
    labels: dict[str, str] = {}
    pos += 1
    unescape = {"\\": "\\", '"': '"', "n": "\n"}
    while True:
        while pos < len(line) and line[pos] in " \t,":
            pos += 1
        if pos < len(line) and line[pos] == "}":
            return labels, pos + 1
        eq = line.find("=", pos)
        if eq < 0 or eq + 1 >= len(line) or line[eq + 1] != '"':
            raise ValueError(f"line {lineno}: expected label=\"value\" at column {pos}")
        name = line[pos:eq].strip()
        check_label_name(name)
        pos, chars = eq + 2, []
        while pos < len(line) and line[pos] != '"':
            if line[pos] == "\\":
                if pos + 1 >= len(line) or line[pos + 1] not in unescape:
                    raise ValueError(f"line {lineno}: bad escape in label {name!r}")
                chars.append(unescape[line[pos + 1]])
                pos += 2
            else:
                chars.append(line[pos])
                pos += 1
        if pos >= len(line):
            raise ValueError(f"line {lineno}: unterminated value of label {name!r}")
        if name in labels:
            raise ValueError(f"line {lineno}: label {name!r} given twice")
        labels[name] = "".join(chars)
        pos += 1


def parse_prometheus_text(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse exposition text into ``{(name, frozenset(labels.items())): value}``.

    ``# HELP`` / ``# TYPE`` and other comment lines are skipped, label values
    are unescaped, ``+Inf``/``-Inf``/``NaN`` understood and an optional
    timestamp after the value ignored. Malformed lines and duplicate samples
    raise ValueError naming the line.
    """
    out: dict[tuple[str, frozenset], float] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pos = 0
        while pos < len(line) and line[pos] not in "{ \t":
            pos += 1
        name = line[:pos]
        if not _METRIC_NAME.match(name):
            raise ValueError(f"line {lineno}: invalid metric name {name!r}")
        labels: dict[str, str] = {}
        if pos < len(line) and line[pos] == "{":
            labels, pos = _parse_labels(line, pos, lineno)
        rest = line[pos:].split()
        if len(rest) not in (1, 2):
            raise ValueError(f"line {lineno}: expected 'value [timestamp]' after the name")
        key = (name, frozenset(labels.items()))
        if key in out:
            raise ValueError(f"line {lineno}: duplicate sample {name}{labels or ''}")
        out[key] = _parse_value(rest[0], lineno)
    return out
