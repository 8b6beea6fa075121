"""Peak resident memory of a process tree, sampled from a background thread.

A benchmark side is often more than one process: vLLM's front end starts an
EngineCore process, and our engine at TP > 1 starts a rank per shard. Each
sample sums the RSS of the root process and every descendant alive at that
moment; the peak over samples (every ``interval_s``) is what is reported.

The sum counts a page once per process that maps it (shared libraries such as
libtorch, shared memory), so for multi-process sides it is an upper bound on
what the tree really holds; a single-process side is measured exactly.
"""

from __future__ import annotations

import threading

import psutil


def tree_rss_bytes(pid: int) -> int:
    """Summed RSS of ``pid`` and its descendants now; 0 once ``pid`` is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:        # exited (or became a zombie) between samples
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:    # a child that exited after children() listed it
            pass
    return total


class PeakRssSampler:
    """Track the peak summed RSS of the process tree rooted at ``pid``.

    Use as a context manager around the tree's lifetime::

        with PeakRssSampler(proc.pid) as sampler:
            proc.wait()
        sampler.peak_mb
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{pid}", daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            if self._stop.wait(self.interval_s):
                return

    @property
    def peak_mb(self) -> float:
        """The peak so far in MiB (1 MB here = 2**20 bytes), one decimal."""
        return round(self.peak_bytes / (1 << 20), 1)

    def __enter__(self) -> "PeakRssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
