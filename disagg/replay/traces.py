"""Trace readers: public LLM request traces -> one ``TraceRecord`` type.

Supported formats (see ``READERS``):

- ``mooncake``: JSON lines ``{"timestamp": ms, "input_length": n,
  "output_length": m, "hash_ids": [...]}``; each hash id names one 512-token
  prompt block, so equal leading ids mean a shared prefix.
- ``azure``: CSV with header ``TIMESTAMP,ContextTokens,GeneratedTokens``;
  ``TIMESTAMP`` is a wall-clock ``YYYY-MM-DD HH:MM:SS.fffffff`` string (plain
  seconds are accepted too). There is no prefix information.

A new format is one function ``(path) -> list[TraceRecord]`` added to
``READERS``. Every reader returns records in arrival order (a stable sort, so
file order breaks ties) with ``arrival_s`` relative to the earliest record;
``index`` is the record's 0-based position among the file's data rows. A
malformed row raises ``ValueError`` naming ``file:line``; blank lines and a
missing final newline are fine.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace, format-independent.

    arrival_s: seconds after the trace's first request.
    input_length / output_length: prompt and generated lengths in tokens.
    hash_ids: prefix-block ids, one per ``block_tokens`` prompt tokens
        (empty when the format has no prefix information).
    block_tokens: tokens per hash id (512 for Mooncake; 0 without hash ids).
    index: 0-based position among the file's data rows.
    """

    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.input_length < 0 or self.output_length < 0:
            raise ValueError(f"record {self.index}: lengths must be >= 0, got "
                             f"input {self.input_length}, output {self.output_length}")
        if self.hash_ids and self.block_tokens <= 0:
            raise ValueError(f"record {self.index}: hash_ids need block_tokens > 0")


def _int_field(value: object, name: str, where: str) -> int:
    """Return ``value`` as a non-negative int or raise a located ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer() and value >= 0:
            return int(value)
        raise ValueError(f"{where}: field {name!r} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: field {name!r} must be >= 0, got {value}")
    return value


_Row = tuple[float, int, int, tuple[int, ...], int]


def _finish(rows: list[_Row], units_per_s: float) -> list[TraceRecord]:
    """Sort ``(time, in, out, hash_ids, block_tokens)`` rows and rebase times.

    Times stay in the file's own unit (ms, ns) until after the subtraction, so
    large absolute clocks lose no precision.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    t0 = rows[order[0]][0] if rows else 0
    return [TraceRecord(arrival_s=(rows[i][0] - t0) / units_per_s, input_length=rows[i][1],
                        output_length=rows[i][2], hash_ids=rows[i][3],
                        block_tokens=rows[i][4], index=i) for i in order]


def iter_json_objects(path: str | Path):
    """Yield ``("file:line", object)`` for each non-blank line of a JSONL file
    (``ValueError`` naming the line when one is not a JSON object)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def read_mooncake(path: str | Path) -> list[TraceRecord]:
    """Read a Mooncake JSONL trace (``timestamp`` in ms, 512-token hash blocks)."""
    rows: list[_Row] = []
    for where, obj in iter_json_objects(path):
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        ts = obj["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise ValueError(f"{where}: 'timestamp' must be a number of ms, got {ts!r}")
        hashes = obj.get("hash_ids", [])
        if not isinstance(hashes, list):
            raise ValueError(f"{where}: 'hash_ids' must be a list, got {hashes!r}")
        hash_ids = tuple(_int_field(h, "hash_ids", where) for h in hashes)
        rows.append((ts, _int_field(obj["input_length"], "input_length", where),
                     _int_field(obj["output_length"], "output_length", where),
                     hash_ids, MOONCAKE_BLOCK_TOKENS if hash_ids else 0))
    return _finish(rows, 1000.0)


def _parse_azure_time(text: str, where: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.f...]`` (up to 9 fraction digits) or plain
    seconds -> integer nanoseconds since the Unix epoch (naive time as UTC)."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            raise ValueError(f"{where}: TIMESTAMP {text!r} is not a finite number")
        return round(seconds * 1e9)
    base, _, frac = text.partition(".")
    try:
        dt = datetime.strptime(base, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        dt = None
    if dt is None or (frac and not (frac.isdigit() and len(frac) <= 9)):
        raise ValueError(f"{where}: TIMESTAMP {text!r} is not 'YYYY-MM-DD HH:MM:SS.fffffff'")
    whole_s = (dt - datetime(1970, 1, 1)) // timedelta(seconds=1)
    return whole_s * 1_000_000_000 + (int(frac) * 10 ** (9 - len(frac)) if frac else 0)


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure(path: str | Path) -> list[TraceRecord]:
    """Read an Azure LLM inference CSV trace (no prefix information)."""
    rows: list[_Row] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = None
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if header is None:
                names = [c.strip() for c in row]
                missing = [c for c in AZURE_COLUMNS if c not in names]
                if missing:
                    raise ValueError(f"{where}: header {names} lacks column(s) {missing}; "
                                     f"expected {','.join(AZURE_COLUMNS)}")
                header = [names.index(c) for c in AZURE_COLUMNS]
                continue
            if len(row) <= max(header):
                raise ValueError(f"{where}: expected {len(names)} columns, got {len(row)}")
            t, ctx, gen = (row[i] for i in header)
            rows.append((_parse_azure_time(t, where), _int_field(ctx, "ContextTokens", where),
                         _int_field(gen, "GeneratedTokens", where), (), 0))
    if header is None:
        raise ValueError(f"{path}: empty file, expected a header {','.join(AZURE_COLUMNS)}")
    return _finish(rows, 1e9)


READERS: dict[str, Callable[[str | Path], list[TraceRecord]]] = {
    "mooncake": read_mooncake,
    "azure": read_azure,
}

_EXTENSIONS = {".jsonl": "mooncake", ".json": "mooncake", ".csv": "azure"}


def detect_format(path: str | Path) -> str:
    """Guess a trace's format from its extension, else from its first line."""
    by_ext = _EXTENSIONS.get(Path(path).suffix.lower())
    if by_ext:
        return by_ext
    with open(path, encoding="utf-8-sig") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "mooncake"
    if "TIMESTAMP" in first:
        return "azure"
    raise ValueError(f"{path}: cannot tell the trace format from its name or first line; "
                     f"pass one of {sorted(READERS)}")


def read_trace(path: str | Path, fmt: str = "auto") -> list[TraceRecord]:
    """Read a trace file in format ``fmt`` (a ``READERS`` key, or ``"auto"``)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {sorted(READERS)} or 'auto'")
    return READERS[fmt](path)
