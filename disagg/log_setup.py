"""Logging of the router and node processes: one line format, and repeats limited.

A peer that sends garbage, or a node that fails the same way on every turn of its
loop, must not fill the log (and the disk) with one message. :class:`RepeatLimit`
lets each message *template* (logger, level and the unformatted message, so
``"dropped a malformed control frame from %r: %s"`` is one template whatever its
arguments) through at most ``burst`` times per ``window_s``: the last of those says that the
rest of the window is suppressed, the rest are counted, and the first one let through
after the window says how many were.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable

BURST = 10
"""Lines of one template let through per window."""
WINDOW_S = 10.0
"""The window, in seconds."""
MAX_TEMPLATES = 4096
"""Templates remembered at most (a message formatted before logging is its own template);
past it, those whose window ended are forgotten."""


class RepeatLimit(logging.Filter):
    """Let each message template through at most ``burst`` times per ``window_s``
    (see the module docstring). Thread-safe; install it on a handler."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if burst < 1 or not window_s > 0:
            raise ValueError(f"burst must be >= 1 and window_s > 0, got {burst}, {window_s}")
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._lock = threading.Lock()
        #: template -> [window start, lines let through, lines suppressed]
        self._seen: dict[tuple, list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] >= self.window_s:
                suppressed = state[2] if state is not None else 0
                if state is None and len(self._seen) >= MAX_TEMPLATES:
                    self._forget(now)
                state = self._seen[key] = [now, 0, 0]
                if suppressed:
                    _note(record, f"{suppressed} more like this were suppressed")
            if state[1] < self.burst:
                state[1] += 1
                if state[1] == self.burst:
                    _note(record, f"{self.burst} like this in {self.window_s:g} s: more are "
                                  "suppressed for the rest of that time")
                return True
            state[2] += 1
            return False

    def _forget(self, now: float) -> None:
        """Drop the templates whose window ended (their suppressed counts are lost)."""
        for key in [k for k, s in self._seen.items() if now - s[0] >= self.window_s]:
            del self._seen[key]


def _note(record: logging.LogRecord, note: str) -> None:
    """Append `` [note]`` to ``record``'s message (a message that is not a string stays)."""
    if isinstance(record.msg, str):
        record.msg = f"{record.msg} [{note}]"


def configure_logging(process: str, level: str) -> None:
    """Log to stderr as ``TIME PROCESS LEVEL MESSAGE`` at ``level``, repeats limited."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {process} %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatLimit) for f in handler.filters):
            handler.addFilter(RepeatLimit())
