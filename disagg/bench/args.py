"""Command-line value parsers the benchmarks share (light: no torch, no engine)."""

from __future__ import annotations

import argparse


def parse_names(text: str, allowed, what: str, hint: str = "") -> tuple[str, ...]:
    """``"a,b"`` → ``("a", "b")`` (duplicates dropped); a name not in ``allowed``, or
    none at all, is an ``argparse.ArgumentTypeError`` naming the ``what`` and choices."""
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; choose from "
            f"{', '.join(allowed)} (comma-separated){hint}")
    return names
