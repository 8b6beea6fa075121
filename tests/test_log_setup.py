"""Repeated log lines are limited per message template (disagg.log_setup)."""

from __future__ import annotations

import logging

import pytest

from disagg.log_setup import RepeatLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _logger(limit: RepeatLimit, name: str = "a") -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    handler.addFilter(limit)
    log = logging.getLogger(f"test-log-setup-{id(limit)}-{name}")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log, lines


def test_a_template_passes_burst_times_per_window_then_reports_what_it_dropped():
    clock = Clock()
    log, lines = _logger(RepeatLimit(burst=3, window_s=10, clock=clock))
    for i in range(25):                       # one template, different arguments
        log.error("dropped a malformed frame from %r: %s", f"peer-{i}", "bad")
        clock.now += 0.1
    log.warning("another template")           # counted on its own
    assert lines == ["dropped a malformed frame from 'peer-0': bad",
                     "dropped a malformed frame from 'peer-1': bad",
                     "dropped a malformed frame from 'peer-2': bad [3 like this in 10 s: more "
                     "are suppressed for the rest of that time]",
                     "another template"]
    clock.now += 10
    log.error("dropped a malformed frame from %r: %s", "peer-99", "bad")
    assert lines[-1] == "dropped a malformed frame from 'peer-99': bad " \
                        "[22 more like this were suppressed]"
    log.error("dropped a malformed frame from %r: %s", "peer-100", "bad")
    assert lines[-1].endswith("'peer-100': bad")        # a fresh window: no note


def test_levels_and_loggers_are_separate_templates():
    clock = Clock()
    limit = RepeatLimit(burst=1, window_s=5, clock=clock)
    log, lines = _logger(limit)
    other, other_lines = _logger(limit, "b")
    for _ in range(3):
        log.error("same text")
        log.warning("same text")
        other.error("same text")
    assert [line.split(" [")[0] for line in lines] == ["same text", "same text"]
    assert [line.split(" [")[0] for line in other_lines] == ["same text"]


def test_bad_limits_raise():
    with pytest.raises(ValueError):
        RepeatLimit(burst=0)
    with pytest.raises(ValueError):
        RepeatLimit(window_s=0)
