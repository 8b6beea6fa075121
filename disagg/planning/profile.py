"""Node rates the planner simulates with: a profile per node shape.

A *shape* is a node's tensor-parallel degree ``tp`` and the compute units each
rank runs on (``units_per_rank``: 1 GPU per rank on GPUs; on a CPU the cores a
rank is pinned to). A node of shape ``(tp, u)`` costs ``tp · u`` units. The
figures are the router's cost-model terms (:mod:`router.calibration`), per
shape::

    prefill node step   = overhead_s + tokens / tokens_per_s            (chunked, FCFS)
    decode node step    = step_base_s + step_per_seq_s · batch
                          + step_per_context_token_s · context tokens of the batch
    decode node step with prompt chunks (local prefill, colocated)
                        = prefill_overhead_s + (prompt tokens + decodes) / prefill_tokens_per_s
    KV transfer         = link_latency_s + input tokens · kv_bytes_per_token / link_bytes_per_s

A profile file is JSON in exactly this shape (unknown keys are refused)::

    {"unit": "core", "kv_bytes_per_token": 46080, "link_bytes_per_s": 1e9,
     "link_latency_s": 0.002, "remote_overhead_s": 0.005,
     "max_num_seqs": 64, "max_batched_tokens": 2048,
     "prefill": [{"tp": 1, "units_per_rank": 1, "tokens_per_s": 180, "overhead_s": 0.05}],
     "decode":  [{"tp": 1, "units_per_rank": 1, "step_base_s": 0.06, "step_per_seq_s": 0.006,
                  "prefill_tokens_per_s": 180, "prefill_overhead_s": 0.05,
                  "kv_capacity_tokens": 5824}]}

A decode entry without ``prefill_tokens_per_s`` borrows the prefill entry of the
same shape (else it cannot prefill locally: no colocated deployments of it).
``kv_capacity_tokens`` (per node) omitted = unlimited.

Shapes not measured are extrapolated only with an explicit parallel efficiency
``E`` (:func:`candidate_profile`): from the role's measured shape with the fewest
units, a node with ``k`` times its units runs ``1 + (k - 1) · E`` times as fast
(every per-token and per-step term divided by that factor; fixed overheads
kept), and holds ``tp / tp_measured`` times its KV (each rank has its own KV
memory). ``E = 1`` is linear scaling.

A running router's ``/metrics`` gives the same figures:
:mod:`disagg.planning.router_metrics`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import msgspec



def _number(name: str, value, minimum: float = 0.0, strict: bool = False) -> None:
    """ValueError unless ``value`` is a finite number >= (or > with ``strict``) ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, "
                         f"got {value!r}")


def _count(name: str, value, minimum: int = 1) -> None:
    """ValueError unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _Shape(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What every node shape has: its TP degree and units per rank."""

    tp: int
    units_per_rank: int = 1
    extrapolated: bool = False   # figures scaled from another shape, not measured

    def _check_shape(self) -> None:
        _count("tp", self.tp)
        _count("units_per_rank", self.units_per_rank)

    @property
    def shape(self) -> tuple[int, int]:
        """``(tp, units_per_rank)``."""
        return self.tp, self.units_per_rank

    @property
    def units(self) -> int:
        """Compute units one node of this shape takes."""
        return self.tp * self.units_per_rank

    @property
    def label(self) -> str:
        """``tp1`` or ``tp1x2`` (2 units per rank); ``~`` marks an extrapolated shape."""
        text = f"tp{self.tp}" + (f"x{self.units_per_rank}" if self.units_per_rank != 1 else "")
        return text + ("~" if self.extrapolated else "")


class PrefillRates(_Shape, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A prefill node shape: a step over ``n`` prompt tokens takes
    ``overhead_s + n / tokens_per_s``."""

    tokens_per_s: float
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        self._check_shape()
        _number("tokens_per_s", self.tokens_per_s, strict=True)
        _number("overhead_s", self.overhead_s)

    def step_s(self, tokens: int) -> float:
        """Seconds of one prefill step over ``tokens`` prompt tokens."""
        return self.overhead_s + tokens / self.tokens_per_s


class DecodeRates(_Shape, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A decode node shape (see the module docstring for the step formulas).

    prefill_tokens_per_s / prefill_overhead_s: its steps that carry prompt
        chunks (local prefill); None = not given (see :meth:`Profile.resolved`).
    kv_capacity_tokens: tokens of KV one node holds (None = unlimited).
    """

    step_base_s: float
    step_per_seq_s: float
    step_per_context_token_s: float = 0.0
    prefill_tokens_per_s: float | None = None
    prefill_overhead_s: float | None = None
    kv_capacity_tokens: int | None = None

    def __post_init__(self) -> None:
        self._check_shape()
        _number("step_base_s", self.step_base_s)
        _number("step_per_seq_s", self.step_per_seq_s)
        _number("step_per_context_token_s", self.step_per_context_token_s)
        if self.step_base_s + self.step_per_seq_s <= 0:
            raise ValueError("a decode step must take time: step_base_s + step_per_seq_s > 0")
        if self.prefill_tokens_per_s is not None:
            _number("prefill_tokens_per_s", self.prefill_tokens_per_s, strict=True)
        if self.prefill_overhead_s is not None:
            _number("prefill_overhead_s", self.prefill_overhead_s)
        if self.kv_capacity_tokens is not None:
            _count("kv_capacity_tokens", self.kv_capacity_tokens)

    @property
    def can_prefill(self) -> bool:
        """Whether its local prefill rate is known (so it can serve colocated)."""
        return self.prefill_tokens_per_s is not None

    def step_s(self, decodes: int, context_tokens: int, prompt_tokens: int = 0) -> float:
        """Seconds of one step: ``decodes`` sequences decoding (their contexts summing to
        ``context_tokens``) and ``prompt_tokens`` of prompt chunks."""
        ctx = self.step_per_context_token_s * context_tokens
        if prompt_tokens:
            if self.prefill_tokens_per_s is None:
                raise ValueError(f"decode shape {self.label} has no prefill_tokens_per_s")
            return (self.prefill_overhead_s or 0.0) + ctx \
                + (prompt_tokens + decodes) / self.prefill_tokens_per_s
        return self.step_base_s + self.step_per_seq_s * decodes + ctx


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every figure the simulation needs (see the module docstring).

    unit: what one compute unit is ("core", "GPU"); only printed.
    remote_overhead_s: extra time to first token of a remotely prefilled request
        (the router's control hops), as the router calibrates it.
    max_num_seqs / max_batched_tokens: the engines' per-step limits (sequences
        decoding at once; tokens per step), as ``EngineConfig``'s defaults.
    """

    decode: tuple[DecodeRates, ...]
    prefill: tuple[PrefillRates, ...] = ()
    kv_bytes_per_token: float
    link_bytes_per_s: float
    link_latency_s: float = 0.0
    remote_overhead_s: float = 0.0
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    unit: str = "unit"

    def __post_init__(self) -> None:
        if not self.decode:
            raise ValueError("a profile needs at least one decode shape")
        _number("kv_bytes_per_token", self.kv_bytes_per_token, strict=True)
        _number("link_bytes_per_s", self.link_bytes_per_s, strict=True)
        _number("link_latency_s", self.link_latency_s)
        _number("remote_overhead_s", self.remote_overhead_s)
        _count("max_num_seqs", self.max_num_seqs)
        _count("max_batched_tokens", self.max_batched_tokens)
        if self.max_batched_tokens <= self.max_num_seqs:
            raise ValueError(f"max_batched_tokens ({self.max_batched_tokens}) must exceed "
                             f"max_num_seqs ({self.max_num_seqs}), or a full batch of decodes "
                             "leaves no token for a prompt chunk")
        for role, entries in (("prefill", self.prefill), ("decode", self.decode)):
            shapes = [e.shape for e in entries]
            dup = sorted({s for s in shapes if shapes.count(s) > 1})
            if dup:
                raise ValueError(f"{role} shapes (tp, units_per_rank) given twice: {dup}")

    def resolved(self) -> Profile:
        """This profile with each decode shape's missing local-prefill figures taken
        from the prefill shape of the same (tp, units_per_rank), where there is one."""
        by_shape = {p.shape: p for p in self.prefill}
        decode = []
        for d in self.decode:
            p = by_shape.get(d.shape)
            if d.prefill_tokens_per_s is None and p is not None:
                overhead = p.overhead_s if d.prefill_overhead_s is None else d.prefill_overhead_s
                d = msgspec.structs.replace(d, prefill_tokens_per_s=p.tokens_per_s,
                                            prefill_overhead_s=overhead)
            decode.append(d)
        return msgspec.structs.replace(self, decode=tuple(decode))

    def transfer_s(self, tokens: int) -> float:
        """Seconds to move the KV of ``tokens`` prompt tokens."""
        return self.link_latency_s + tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def to_json(self) -> bytes:
        """The profile as a profile file (indented JSON)."""
        return msgspec.json.format(msgspec.json.encode(self), indent=2) + b"\n"


def load_profile(path: str | Path) -> Profile:
    """Read and check a JSON profile file (ValueError naming the file and the field)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read profile {path}: {e.strerror}") from None
    try:
        return msgspec.json.decode(data, type=Profile)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ValueError(f"profile {path}: {e}") from None


def _scaled(entry, factor: float, kv_factor: float, tp: int, units_per_rank: int):
    """``entry`` (a measured shape) as shape ``(tp, units_per_rank)``: per-token and
    per-step terms divided by ``factor``, KV capacity times ``kv_factor``."""
    common = dict(tp=tp, units_per_rank=units_per_rank, extrapolated=True)
    if isinstance(entry, PrefillRates):
        return PrefillRates(tokens_per_s=entry.tokens_per_s * factor, overhead_s=entry.overhead_s,
                            **common)
    cap = entry.kv_capacity_tokens
    return DecodeRates(step_base_s=entry.step_base_s / factor,
                       step_per_seq_s=entry.step_per_seq_s / factor,
                       step_per_context_token_s=entry.step_per_context_token_s / factor,
                       prefill_tokens_per_s=None if entry.prefill_tokens_per_s is None
                       else entry.prefill_tokens_per_s * factor,
                       prefill_overhead_s=entry.prefill_overhead_s,
                       kv_capacity_tokens=None if cap is None else max(1, round(cap * kv_factor)),
                       **common)


def _candidates(role: str, measured: tuple, tps: list[int] | None, uprs: list[int] | None,
                efficiency: float | None, budget: int | None = None) -> tuple:
    """The role's candidate shapes of at most ``budget`` units (None: any): measured
    ones as they are, others extrapolated."""
    if not measured:
        return ()
    if tps is None and uprs is None:
        return tuple(m for m in measured if budget is None or m.units <= budget)
    tps = tps or sorted({m.tp for m in measured})
    uprs = uprs or sorted({m.units_per_rank for m in measured})
    by_shape = {m.shape: m for m in measured}
    base = min(measured, key=lambda m: (m.units, m.tp))
    out, missing = [], []
    for tp, upr in itertools.product(tps, uprs):
        if budget is not None and tp * upr > budget:
            continue                       # fits no deployment: neither needed nor measured
        if (tp, upr) in by_shape:
            out.append(by_shape[(tp, upr)])
        elif efficiency is None:
            missing.append(f"tp{tp}x{upr}")
        else:
            k = tp * upr / base.units
            out.append(_scaled(base, 1.0 + (k - 1.0) * efficiency, tp / base.tp, tp, upr))
    if missing:
        raise ValueError(f"{role} shapes {', '.join(missing)} are not in the profile; measure "
                         "them, or pass --tp-efficiency to extrapolate from "
                         f"{base.label} (measured)")
    return tuple(out)


def candidate_profile(profile: Profile, tps: list[int] | None = None,
                      units_per_rank: list[int] | None = None,
                      efficiency: float | None = None, max_units: int | None = None) -> Profile:
    """``profile`` with exactly the candidate shapes of each role: every ``tps`` ×
    ``units_per_rank`` combination (None: the values measured for that role), measured
    where the profile has it, else extrapolated with ``efficiency`` (module docstring);
    without ``efficiency`` a missing shape is a ValueError. ``max_units``: the most
    compute a deployment may take; shapes no deployment within it can use (a decode
    shape above it, a prefill shape that leaves no room for the smallest decode
    candidate) are left out rather than asked for."""
    for name, values in (("tp", tps), ("units_per_rank", units_per_rank)):
        if values is not None:
            if not values:
                raise ValueError(f"{name} candidates must not be empty")
            for v in values:
                _count(name, v)
    if efficiency is not None:
        _number("tp efficiency", efficiency, strict=True)
        if efficiency > 1:
            raise ValueError(f"tp efficiency must be in (0, 1], got {efficiency!r}")
    if max_units is not None:
        _count("max units", max_units)
    profile = profile.resolved()
    decode = _candidates("decode", profile.decode, tps, units_per_rank, efficiency, max_units)
    smallest = min((d.units for d in decode), default=0)
    return msgspec.structs.replace(
        profile, decode=decode,
        prefill=_candidates("prefill", profile.prefill, tps, units_per_rank, efficiency,
                            None if max_units is None else max_units - smallest))
