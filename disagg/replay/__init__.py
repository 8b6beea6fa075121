"""Trace replay: read public request traces, shape them to a machine, report.

Pure building blocks (stdlib + numpy) for the replay tool:

- ``traces``: ``read_trace(path, fmt="auto")`` -> ``list[TraceRecord]``
  (Mooncake JSONL, Azure CSV; ``READERS`` maps a format name to its reader);
- ``shaping``: ``shape(records, ShapeConfig(...))`` -> ``list[ShapedRequest]``
  (window, speed-up or target rate, length scaling/clipping, prefix-preserving
  token-id prompts);
- ``report``: ``RequestResult`` per request, ``summarize`` per run, JSONL /
  JSON / Markdown output.

Import each name from its module.
"""
