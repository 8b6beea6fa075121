"""Trace replay: read public request traces, shape them to a machine, report.

Pure building blocks (stdlib + numpy) for the replay tool:

- ``traces``: ``read_trace(path, fmt="auto")`` -> ``list[TraceRecord]``
  (Mooncake JSONL, Azure CSV; ``READERS`` maps a format name to its reader);
- ``shaping``: ``shape(records, ShapeConfig(...))`` -> ``list[ShapedRequest]``
  (window, speed-up or target rate, length scaling/clipping, prefix-preserving
  token-id prompts);
- ``report``: ``RequestResult`` per request, ``summarize`` per run, JSONL /
  JSON / Markdown output.
"""

from __future__ import annotations

from disagg.replay.report import (
    RequestResult,
    latency_stats,
    markdown_table,
    meets_slo,
    percentile,
    read_jsonl,
    summarize,
    write_jsonl,
    write_summary_json,
)
from disagg.replay.shaping import ShapeConfig, ShapedRequest, mean_rate, shape
from disagg.replay.traces import READERS, TraceRecord, detect_format, read_azure, read_mooncake, read_trace

__all__ = [
    "READERS", "RequestResult", "ShapeConfig", "ShapedRequest", "TraceRecord", "detect_format",
    "latency_stats", "markdown_table", "mean_rate", "meets_slo", "percentile", "read_azure",
    "read_jsonl", "read_mooncake", "read_trace", "shape", "summarize", "write_jsonl",
    "write_summary_json",
]
