"""A server process a benchmark runs against: started in its own process group
(optionally pinned to cores), waited on until ``GET /health`` is 200, stopped.

Used by ``disagg bench serve``, ``disagg experiment``'s peer series and
``scripts/client_compat.py``, for ``vllm serve`` and ``disagg serve`` alike.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def _say(msg: str) -> None:
    print(f"[server] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """True when ``GET url/health`` answers 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Server:
    """One server process group: started, waited on until ``/health`` is 200, stopped.

    ``cpus``: pin it (and every process it starts) to these cores, by the affinity
    mask set before it runs; None leaves it unpinned.
    """

    def __init__(self, side: str, cmd: list[str], env: dict[str, str], port: int,
                 log: Path, cpus: set[int] | None = None) -> None:
        self.side, self.cmd, self.env, self.log = side, cmd, env, log
        self.cpus = None if cpus is None else frozenset(cpus)
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        """Start it and wait until healthy; the seconds that took (``RuntimeError`` if not)."""
        _say(f"starting {self.side}: {shlex.join(self.cmd)}  (log {self.log})")
        t0 = time.monotonic()
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env},
                                         start_new_session=True,
                                         preexec_fn=None if self.cpus is None else self._pin)
        while not healthy(self.url):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.side} exited with {self.proc.returncode} during "
                                   f"start-up; the end of its log:\n{log_tail(self.log)}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{self.side} not healthy after {timeout_s:.0f} s; the end "
                                   f"of its log:\n{log_tail(self.log)}")
            time.sleep(1.0)
        seconds = time.monotonic() - t0
        _say(f"{self.side} ready in {seconds:.0f} s at {self.url}")
        return seconds

    def _pin(self) -> None:
        os.sched_setaffinity(0, self.cpus)     # in the child, before exec

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to its process group, then wait until every process of the group is
        gone (a server's children, such as vLLM's engine process, can outlive its main
        process and would share the next server's cores); SIGKILL to the group after
        ``timeout_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if not group_members(pgid):
            self.proc.wait()
            return
        _say(f"stopping {self.side}")
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_group_gone(self.proc, timeout_s):
            _say(f"{self.side}: processes {sorted(group_members(pgid))} still running "
                 f"{timeout_s:.0f} s after SIGTERM: SIGKILL")
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(self.proc, 30.0)
        self.proc.wait()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except ProcessLookupError:
            pass                                   # ended while listed
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass                                       # already gone


def _wait_group_gone(leader: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for every process of ``leader``'s group to end (reaping
    the leader, whose zombie would otherwise stay a member); True once none is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        leader.poll()
        if not group_members(leader.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
