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
process's locks, so a crashed node never blocks the other one. An uncontended
turn costs four system calls.

A holder that is alive but stuck (stopped with SIGSTOP, hung in a step) keeps
its lock, though, and measured on 2 cores a decode node behind a stopped
prefill node froze every stream for as long as it stayed stopped. So a wait is
bounded: a contended turn is waited for on a thread of its own, and a step that
has not got it within ``max_wait_s`` computes without it (oversubscribed, but
going on). The steps after it do not wait at all until that thread gets the turn
(the holder let go), which it hands back at once; then turns resume. Waiting
sleeps in the kernel (``flock`` releases the GIL).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time

from disagg.config import DEFAULT_COMPUTE_TURN_WAIT_S, check_wait_s

log = logging.getLogger("disagg.engine")

# who has the turn, from this engine's side (changed under ComputeTurns._cond)
_IDLE = "idle"            # not held, nobody here waiting for it
_SEEKING = "seeking"      # the waiter thread is getting it for the step that waits
_HELD = "held"            # the step in progress holds it
_LATE = "late"            # a step gave up waiting; the waiter thread still waits, to hand it back


class ComputeTurns:
    """The turn lock at ``path`` (``PATH.door`` and ``PATH.turn`` are created if
    missing; every engine that should alternate with this one names the same path).

    Use as a context manager around one step's compute, from one thread at a time.
    A step waits at most ``max_wait_s`` for its turn (see the module docstring).
    ``waited_s`` adds up the time spent waiting for turns, ``skipped`` counts the
    steps computed without one."""

    def __init__(self, path: str, max_wait_s: float = DEFAULT_COMPUTE_TURN_WAIT_S) -> None:
        if not path or path.endswith(os.sep):
            raise ValueError(f"compute turns: need a file path prefix, got {path!r}")
        check_wait_s("compute turns: max_wait_s", max_wait_s)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"compute turns {path!r}: directory {parent} does not exist")
        self.path, self.max_wait_s = path, float(max_wait_s)
        self._door = os.open(path + ".door", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._turn = os.open(path + ".turn", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            os.close(self._door)
            raise
        self.waited_s = 0.0
        self.skipped = 0
        self._cond = threading.Condition()
        self._state = _IDLE
        self._closed = False
        self._waiter: threading.Thread | None = None

    def __enter__(self) -> "ComputeTurns":
        t0 = time.perf_counter()
        try:
            self._acquire()
        finally:
            self.waited_s += time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            if self._state != _HELD:
                return                     # this step went without the turn
            self._state = _IDLE
        fcntl.flock(self._turn, fcntl.LOCK_UN)

    def _acquire(self) -> None:
        """Take the turn (state ``_HELD``), or give up on it (``_LATE``, ``skipped`` + 1)."""
        with self._cond:
            if self._state == _LATE:       # the holder is still stuck: do not wait again
                self.skipped += 1
                return
        if _try_lock(self._door):          # nobody waiting, and the turn free: take it here
            got = _try_lock(self._turn)
            fcntl.flock(self._door, fcntl.LOCK_UN)
            if got:
                with self._cond:
                    self._state = _HELD
                return
        with self._cond:
            self._state = _SEEKING
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_for_turns, daemon=True,
                                                name="compute-turn")
                self._waiter.start()
            self._cond.notify_all()
            if self._cond.wait_for(lambda: self._state == _HELD, timeout=self.max_wait_s):
                return
            self._state = _LATE
            self.skipped += 1
        log.warning("compute turn %s not granted in %g s: the other engine on these cores "
                    "is stuck or in a very long step; computing without turns until it lets "
                    "go", self.path, self.max_wait_s)

    def _wait_for_turns(self) -> None:
        """The waiter thread: gets the turn for each step that asks (``_SEEKING``), or
        hands it straight back when that step gave up on it (``_LATE``)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._state == _SEEKING or self._closed)
                if self._closed:
                    return
            fcntl.flock(self._door, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._turn, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._door, fcntl.LOCK_UN)
            with self._cond:
                if self._state == _SEEKING:
                    self._state = _HELD
                    self._cond.notify_all()
                    continue
                # _LATE: the step went on without it. Said before the next step can see
                # _IDLE, so the warning comes before any turn taken again.
                log.warning("compute turn %s free again: taking turns again (%d step(s) "
                            "went without one in all)", self.path, self.skipped)
                self._state = _IDLE
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock files (idempotent; the files stay for the other engines). A
        waiter thread still blocked on the lock keeps them open until the process ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._state in (_SEEKING, _LATE):
                return
        for name in ("_door", "_turn"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def turn_holders(path: str) -> set[int]:
    """The pids holding the turn lock at ``path`` now, from ``/proc/locks`` (Linux;
    processes waiting for it are left out): who a waiting engine waits for."""
    inode = os.stat(path + ".turn").st_ino
    pids = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()        # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF"
            if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
                pids.add(int(fields[4]))     # a waiter's line reads "1: -> FLOCK ..."
    return pids


def _try_lock(fd: int) -> bool:
    """Take ``fd``'s exclusive ``flock`` if nobody holds it; False if somebody does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
