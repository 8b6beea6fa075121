"""Shape a trace to a machine: window, time scaling, lengths, token synthesis.

``shape(records, cfg)`` turns ``TraceRecord``s into ``ShapedRequest``s, each a
send time plus a token-id prompt (sent as a token-id prompt, so no tokenizer
round trip changes its length) and a ``max_tokens``. Steps, in order:

1. window: records with ``start_s <= arrival_s < start_s + duration_s`` (trace
   time), then the first ``max_requests`` of them;
2. time: send times relative to the first selected request, divided by
   ``speedup``, or rescaled so the mean rate ``(n - 1) / (last - first)``
   equals ``target_rate``;
3. lengths: multiplied by ``length_scale`` (rounded half up, at least 1),
   clipped to ``max_input_tokens`` / ``max_output_tokens``, then to
   ``max_model_len`` (input + output must fit: output shrinks first, down to 1
   token, then input);
4. tokens: prefix-preserving synthesis, below.

Prefix-preserving synthesis. A hash id ``h`` always becomes the same token ids:
the first ``B`` ids of an endless stream drawn from SHAKE-256 keyed by
``(seed, h)`` (stable across processes, machines and Python/numpy versions),
where ``B`` is the record's block size times ``length_scale``, the same for
every block so equal ids stay equal. A prompt is its blocks' ids concatenated
and cut to the shaped input length; if the blocks run short, per-request ids
keyed by ``(seed, record index)`` fill the rest::

    record A  hash_ids [0, 7, 9]   input 1300     (B = 512)
    record B  hash_ids [0, 7, 4]   input 1100
                        |  |  |
    A prompt  [ T(0)[:512] | T(7)[:512] | T(9)[:276] ]
    B prompt  [ T(0)[:512] | T(7)[:512] | T(4)[:76]  ]
              `------ 1024 shared ids -----'  -> a real prefix-cache hit

    record C  no hash_ids  input 300
    C prompt  [ R(C.index)[:300] ]                     -> shares nothing

Ids lie in ``[min_token_id, vocab_size)`` so special ids (BOS/EOS/PAD, usually
the lowest few) never appear.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from disagg.replay.traces import TraceRecord


def _check_opt(name: str, value, minimum, integer: bool) -> None:
    """Raise ValueError unless ``value`` is None or a finite number >= ``minimum``."""
    if value is None:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} "
                         f"or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ShapeConfig:
    """How to fit a trace to the machine under test (all times in seconds).

    vocab_size: the served model's vocabulary; ids are drawn below it.
    start_s / duration_s / max_requests: the window, in trace time.
    speedup: divide every gap by this (2.0 = twice the rate); exclusive with
        target_rate (requests/s), which rescales arrivals to that mean rate.
    length_scale: multiply input and output lengths (and the block size)
        before clipping to max_input_tokens, max_output_tokens, max_model_len.
    min_token_id: lowest id to emit (keeps special ids out of prompts).
    seed: changes every synthesized token, keeping the prefix structure.
    """

    vocab_size: int
    start_s: float = 0.0
    duration_s: float | None = None
    max_requests: int | None = None
    speedup: float = 1.0
    target_rate: float | None = None
    length_scale: float = 1.0
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_model_len: int | None = None
    min_token_id: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_opt("vocab_size", self.vocab_size, 1, integer=True)
        _check_opt("min_token_id", self.min_token_id, 0, integer=True)
        if self.vocab_size is None or self.vocab_size <= self.min_token_id:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed min_token_id "
                             f"({self.min_token_id}) so some token ids are left to draw")
        _check_opt("start_s", self.start_s, 0.0, integer=False)
        _check_opt("max_requests", self.max_requests, 1, integer=True)
        _check_opt("max_input_tokens", self.max_input_tokens, 1, integer=True)
        _check_opt("max_output_tokens", self.max_output_tokens, 1, integer=True)
        _check_opt("max_model_len", self.max_model_len, 2, integer=True)
        for name in ("duration_s", "speedup", "target_rate", "length_scale"):
            value = getattr(self, name)
            _check_opt(name, value, 0.0, integer=False)
            if value == 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.start_s is None or self.speedup is None or self.length_scale is None:
            raise ValueError("start_s, speedup and length_scale must be numbers, not None")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.target_rate is not None and self.speedup != 1.0:
            raise ValueError("give either speedup or target_rate, not both "
                             f"(speedup={self.speedup}, target_rate={self.target_rate})")


@dataclass(frozen=True)
class ShapedRequest:
    """One request to send: at ``send_at_s`` after the replay starts, the
    token-id prompt, generating exactly ``max_tokens``; ``source_index`` is the
    trace record's index."""

    send_at_s: float
    prompt_token_ids: list[int]
    max_tokens: int
    source_index: int


def token_stream(kind: str, key: int, n: int, cfg: ShapeConfig) -> list[int]:
    """The first ``n`` ids of the stream for ``(cfg.seed, kind, key)``.

    Streams are prefix-consistent: ``token_stream(k, h, m)[:n] ==
    token_stream(k, h, n)`` for ``m >= n``.
    """
    if n <= 0:
        return []
    label = f"disagg-replay/v1/{kind}/{cfg.seed}/{key}".encode()
    words = np.frombuffer(hashlib.shake_256(label).digest(4 * n), dtype="<u4")
    span = cfg.vocab_size - cfg.min_token_id
    return (words % np.uint32(span) + np.uint32(cfg.min_token_id)).tolist()


def _scale(n: int, factor: float) -> int:
    """``n * factor`` rounded half up, at least 1."""
    return max(1, math.floor(n * factor + 0.5))


def shape_lengths(record: TraceRecord, cfg: ShapeConfig) -> tuple[int, int]:
    """The record's ``(input, output)`` token counts after scaling and clipping."""
    inp = _scale(record.input_length, cfg.length_scale)
    out = _scale(record.output_length, cfg.length_scale)
    if cfg.max_input_tokens is not None:
        inp = min(inp, cfg.max_input_tokens)
    if cfg.max_output_tokens is not None:
        out = min(out, cfg.max_output_tokens)
    limit = cfg.max_model_len
    if limit is not None and inp + out > limit:
        out = max(1, min(out, limit - inp))
        inp = min(inp, limit - out)
    return inp, out


def prompt_tokens(record: TraceRecord, input_len: int, cfg: ShapeConfig) -> list[int]:
    """Synthesize ``input_len`` prompt ids for ``record`` (see module docstring)."""
    tokens: list[int] = []
    if record.hash_ids:
        block = _scale(record.block_tokens, cfg.length_scale)
        for h in record.hash_ids:
            need = input_len - len(tokens)
            if need <= 0:
                break
            tokens.extend(token_stream("block", h, min(block, need), cfg))
    tokens.extend(token_stream("request", record.index, input_len - len(tokens), cfg))
    return tokens


def select_window(records: list[TraceRecord], cfg: ShapeConfig) -> list[TraceRecord]:
    """Records inside the window, in arrival order, at most ``max_requests``."""
    ordered = sorted(records, key=lambda r: r.arrival_s)
    end = math.inf if cfg.duration_s is None else cfg.start_s + cfg.duration_s
    chosen = [r for r in ordered if cfg.start_s <= r.arrival_s < end]
    if cfg.max_requests is not None:
        chosen = chosen[:cfg.max_requests]
    if not chosen:
        last = ordered[-1].arrival_s if ordered else 0.0
        raise ValueError(f"the window start_s={cfg.start_s}, duration_s={cfg.duration_s} "
                         f"selects no requests (the trace has {len(ordered)} requests "
                         f"arriving from 0 to {last:.3f} s)")
    return chosen


def send_times(records: list[TraceRecord], cfg: ShapeConfig) -> list[float]:
    """Send times for already-windowed ``records``: 0 for the first, then the
    trace's gaps divided by ``speedup`` or rescaled to ``target_rate``."""
    if not records:
        return []
    rel = [r.arrival_s - records[0].arrival_s for r in records]
    if cfg.target_rate is None:
        return [t / cfg.speedup for t in rel]
    if len(rel) < 2:
        return [0.0]
    if rel[-1] <= 0:
        raise ValueError(f"all {len(rel)} selected requests arrive at the same instant; "
                         "a target_rate cannot rescale them (use speedup or a wider window)")
    factor = (len(rel) - 1) / cfg.target_rate / rel[-1]
    return [t * factor for t in rel]


def mean_rate(times: list[float]) -> float:
    """Mean request rate ``(n - 1) / (last - first)`` of sorted send times."""
    if len(times) < 2 or times[-1] <= times[0]:
        raise ValueError("a mean rate needs at least two distinct send times")
    return (len(times) - 1) / (times[-1] - times[0])


def shape(records: list[TraceRecord], cfg: ShapeConfig) -> list[ShapedRequest]:
    """Window, time-scale and length-shape ``records`` into requests to send."""
    chosen = select_window(records, cfg)
    out: list[ShapedRequest] = []
    for record, at in zip(chosen, send_times(chosen, cfg)):
        inp, max_tokens = shape_lengths(record, cfg)
        out.append(ShapedRequest(send_at_s=at, prompt_token_ids=prompt_tokens(record, inp, cfg),
                                 max_tokens=max_tokens, source_index=record.index))
    return out
