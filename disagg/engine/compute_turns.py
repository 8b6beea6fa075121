"""Engines that share CPU cores take turns at compute, fairly, across processes.

Two engines on the same cores (a prefill node and a decode node on a machine
too small to split) each run an OpenMP team as wide as the cores. Run at
once, the teams oversubscribe the cores, and a team's threads spin-wait at
every barrier for a teammate the kernel has descheduled: measured on 2 cores,
a remote prefill running beside decode steps turned a 30 ms decode step into
~300 ms and a 1 req/s load into 10 s time to first token. Taking turns keeps
one team on the cores at a time, which is what one colocated engine does
anyway, step by step.

A turn is one step's compute (the forward pass and sampling). The lock is two
``flock`` files next to each other (``PATH.door``, ``PATH.turn``): a waiter
holds the door while it waits for the turn, so an engine that ends its turn
and wants the next one queues behind the waiter instead of taking the turn
straight back; two busy engines therefore alternate. The kernel drops a dead
process's locks, so a crashed node never blocks the other one. Waiting sleeps
in the kernel (``flock`` releases the GIL); an uncontended turn costs three
system calls.
"""

from __future__ import annotations

import fcntl
import os
import time


class ComputeTurns:
    """The turn lock at ``path`` (``PATH.door`` and ``PATH.turn`` are created if
    missing; every engine that should alternate with this one names the same path).

    Use as a context manager around one step's compute. ``waited_s`` adds up the
    time spent waiting for turns."""

    def __init__(self, path: str) -> None:
        if not path or path.endswith(os.sep):
            raise ValueError(f"compute turns: need a file path prefix, got {path!r}")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"compute turns {path!r}: directory {parent} does not exist")
        self.path = path
        self._door = os.open(path + ".door", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._turn = os.open(path + ".turn", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            os.close(self._door)
            raise
        self.waited_s = 0.0

    def __enter__(self) -> "ComputeTurns":
        t0 = time.perf_counter()
        fcntl.flock(self._door, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._turn, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._door, fcntl.LOCK_UN)
        self.waited_s += time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._turn, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock files (idempotent; the files stay for the other engines)."""
        for name in ("_door", "_turn"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
