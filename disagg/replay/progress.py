"""A one-line progress display for long replays (stderr).

On a terminal the line is redrawn in place twice a second; otherwise (logs,
CI) a full line is printed every ``log_every_s`` seconds, so a long run never
goes silent::

    [conditional @ 0.50 req/s] sent 31/60  done 27  errors 0  in flight 4  42.1 s
"""

from __future__ import annotations

import asyncio
import sys
import time


class Progress:
    """Counts sent and finished requests; ``start`` inside a running event loop."""

    def __init__(self, total: int, label: str, stream=None, log_every_s: float = 10.0) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.period = 0.5 if self.tty else log_every_s
        self.num_sent = self.num_done = self.num_errors = 0
        self.t0 = time.perf_counter()
        self._task: asyncio.Task | None = None

    def sent(self) -> None:
        """One more request went out."""
        self.num_sent += 1

    def done(self, ok: bool) -> None:
        """One more request finished (``ok`` False for an error)."""
        self.num_done += 1
        self.num_errors += not ok

    def line(self) -> str:
        """The current status line."""
        return (f"[{self.label}] sent {self.num_sent}/{self.total}  done {self.num_done}  "
                f"errors {self.num_errors}  in flight {self.num_sent - self.num_done}  "
                f"{time.perf_counter() - self.t0:.1f} s")

    def _show(self, final: bool = False) -> None:
        end = "\n" if final or not self.tty else ""
        prefix = "\r\x1b[K" if self.tty else ""
        print(prefix + self.line(), end=end, file=self.stream, flush=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            self._show()

    def start(self) -> None:
        """Begin redrawing (needs a running event loop)."""
        self.t0 = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Stop redrawing and print the final line."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._show(final=True)
