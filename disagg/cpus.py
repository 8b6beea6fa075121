"""Which CPU cores a process may use, and pinning to a set of them (torch-free).

``--cpus`` flags take Linux's list syntax (``0-3,8``). Pinning sets the
affinity mask, which child processes (TP ranks) inherit; thread counts then
follow :func:`usable_cpus`.
"""

from __future__ import annotations

import os


def usable_cpus() -> list[int]:
    """The cores this process may run on (its affinity mask), ascending."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))     # no affinity API (macOS)


def parse_cpus(text: str) -> set[int]:
    """``"0-3,8"`` → ``{0, 1, 2, 3, 8}``; ``ValueError`` on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--cpus must look like 0-3,8, got {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus range {part.strip()!r} is empty or negative")
        cpus.update(range(first, last + 1))
    return cpus


def pin_to_cpus(text: str) -> None:
    """Restrict this process (and the TP ranks it starts) to the cores in ``text``."""
    cpus = parse_cpus(text)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs a platform with CPU affinity (Linux)")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ValueError(f"cannot pin to cores {sorted(cpus)}: {exc} "
                         f"(this machine has {os.cpu_count()})") from None
