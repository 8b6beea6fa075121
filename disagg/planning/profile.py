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

:func:`profile_from_metrics` reads the same figures from a running router's
``/metrics``: the rates from ``disagg_cost_model_estimate`` (the pooled fits, node
``"*"``: one per role over all its nodes), each role's shape, the KV bytes of a token
and a decode node's KV capacity from what its registered nodes reported
(``disagg_node_tp``, ``disagg_node_compute_units``, ``disagg_node_kv_bytes_per_token``,
``disagg_node_kv_capacity_tokens``), and a warning for each fit that
``disagg_cost_model_observations`` says has too few measurements to be more than the
router's prior. Because a role's fit is pooled, the nodes of one role must share one
shape: mixed shapes are an error unless the caller says which shape the fit stands for.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import msgspec

from disagg.replay.server_metrics import Samples, scrape
from router.policy import MIN_PREDICTION_OBSERVATIONS


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
                efficiency: float | None) -> tuple:
    """The role's candidate shapes: measured ones as they are, others extrapolated."""
    if not measured:
        return ()
    if tps is None and uprs is None:
        return measured
    tps = tps or sorted({m.tp for m in measured})
    uprs = uprs or sorted({m.units_per_rank for m in measured})
    by_shape = {m.shape: m for m in measured}
    base = min(measured, key=lambda m: (m.units, m.tp))
    out, missing = [], []
    for tp, upr in itertools.product(tps, uprs):
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
                      efficiency: float | None = None) -> Profile:
    """``profile`` with exactly the candidate shapes of each role: every ``tps`` ×
    ``units_per_rank`` combination (None: the values measured for that role), measured
    where the profile has it, else extrapolated with ``efficiency`` (module docstring);
    without ``efficiency`` a missing shape is a ValueError."""
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
    profile = profile.resolved()
    return msgspec.structs.replace(
        profile,
        prefill=_candidates("prefill", profile.prefill, tps, units_per_rank, efficiency),
        decode=_candidates("decode", profile.decode, tps, units_per_rank, efficiency))


ESTIMATE = "disagg_cost_model_estimate"
"""The router's gauge of its calibrated cost-model terms (``router/metrics.py``)."""

OBSERVATIONS = "disagg_cost_model_observations"
"""The router's gauge of how many measurements back each ``ESTIMATE`` term."""

NODE_GAUGES = {"tp": "disagg_node_tp", "units": "disagg_node_compute_units",
               "kv_capacity_tokens": "disagg_node_kv_capacity_tokens",
               "kv_bytes_per_token": "disagg_node_kv_bytes_per_token"}
"""The router's per-node gauges of what each node registered with, ``{node, role}``."""

FITS = (
    ("prefill on prefill nodes", "prefill", ("prefill_tokens_per_s", "prefill_overhead_s")),
    ("prefill on decode nodes", "decode", ("prefill_tokens_per_s", "prefill_overhead_s")),
    ("decode step", "", ("decode_step_base_s", "decode_step_per_seq_s")),
    ("KV link", "", ("link_bytes_per_s", "link_latency_s")),
    ("remote overhead", "", ("remote_overhead_s",)),
)
"""The router's fits a profile is read from: (what, role label, its terms)."""


def _pooled(samples: Samples, metric: str) -> dict[tuple[str, str], float]:
    """``{(name, role): value}`` of ``metric``'s pooled rows (node ``"*"`` or no node)."""
    out = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == metric and labels.get("node", "") in ("*", ""):
            out[(labels.get("name", ""), labels.get("role", ""))] = value
    return out


def _nodes(samples: Samples) -> dict[str, dict[str, dict[str, int]]]:
    """``{role: {node: {figure: value}}}`` from the per-node registration gauges."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for key, metric in NODE_GAUGES.items():
        for (name, labels), value in samples.items():
            if name == metric:
                labels = dict(labels)
                node = out.setdefault(labels.get("role", ""), {}).setdefault(
                    labels.get("node", ""), {})
                node[key] = int(value)
    return out


def _node_shape(role: str, node: str, figures: dict[str, int]) -> tuple[int, int]:
    """A registered node's ``(tp, units_per_rank)``; ValueError when it cannot say."""
    tp, units = figures.get("tp", 0), figures.get("units", 0)
    if tp < 1 or units < 1:
        raise ValueError(f"{role} node {node} did not report its TP and compute units (an "
                         f"older node?): say its shape with --metrics-{role}-shape")
    if units % tp:
        raise ValueError(f"{role} node {node} runs TP {tp} on {units} compute units, which "
                         f"do not split evenly over its ranks: say the shape its fit stands "
                         f"for with --metrics-{role}-shape")
    return tp, units // tp


def _role_shape(role: str, nodes: dict[str, dict[str, int]], given: tuple[int, int] | None,
                warnings: list[str]) -> tuple[int, int]:
    """The shape the role's pooled fit stands for: ``given``, else its registered
    nodes' one shape (ValueError when they differ), else TP 1 with a warning."""
    if given is not None:
        return given
    if not nodes:
        warnings.append(f"no {role} node is registered with the router: its shape is taken "
                        f"as TP 1, 1 unit per rank (say it with --metrics-{role}-shape)")
        return 1, 1
    shapes = {node: _node_shape(role, node, f) for node, f in sorted(nodes.items())}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} tp{t}x{u}" for n, (t, u) in shapes.items())
        raise ValueError(f"the router pools one fit over {role} nodes of different shapes "
                         f"({listed}): run one shape per role while measuring, or say which "
                         f"shape the fit stands for with --metrics-{role}-shape")
    return next(iter(shapes.values()))


def profile_from_samples(samples: Samples, *, prefill_shape: tuple[int, int] | None = None,
                         decode_shape: tuple[int, int] | None = None,
                         kv_bytes_per_token: float | None = None,
                         kv_capacity_tokens: int | None = None, unit: str = "unit",
                         **limits) -> tuple[Profile, list[str]]:
    """A profile from scraped router metrics, and warnings about it.

    Each argument left None is read from what the router's registered nodes reported
    (module docstring): a role's shape is its nodes' one ``(tp, units_per_rank)``
    (``compute_units / tp``; ValueError when its nodes differ; TP 1 and a warning when
    it has none); ``kv_bytes_per_token`` the nodes' one value (ValueError when they
    differ or none is registered); ``kv_capacity_tokens`` the smallest decode node's
    (a warning when they differ; unlimited without decode nodes). A fit with fewer
    than ``router.policy.MIN_PREDICTION_OBSERVATIONS`` measurements is warned about.
    ``limits``: ``max_num_seqs``, ``max_batched_tokens`` (Profile's defaults otherwise).
    """
    est = _pooled(samples, ESTIMATE)
    missing = [f"{n}{{role={r!r}}}" if r else n
               for _, r, terms in FITS for n in terms if (n, r) not in est]
    if missing:
        raise ValueError(f"the router's metrics lack {ESTIMATE} for {', '.join(missing)} "
                         "(is it a disagg router with the cost-model calibration?)")
    warnings: list[str] = []
    counts = _pooled(samples, OBSERVATIONS)
    if not counts:
        warnings.append(f"the router does not export {OBSERVATIONS}: how many measurements "
                        "back its fits is unknown")
    for what, role, terms in FITS:
        seen = [counts[(n, role)] for n in terms if (n, role) in counts]
        if seen and min(seen) < MIN_PREDICTION_OBSERVATIONS:
            warnings.append(f"{what} ({', '.join(terms)}): {int(min(seen))} measurement(s), "
                            f"fewer than {MIN_PREDICTION_OBSERVATIONS}, so mostly the "
                            "router's prior (send some traffic through every path first)")
    nodes = _nodes(samples)
    ptp, pupr = _role_shape("prefill", nodes.get("prefill", {}), prefill_shape, warnings)
    dtp, dupr = _role_shape("decode", nodes.get("decode", {}), decode_shape, warnings)
    if kv_bytes_per_token is None:
        sizes = {f["kv_bytes_per_token"] for role in nodes.values() for f in role.values()
                 if f.get("kv_bytes_per_token")}
        if len(sizes) != 1:
            raise ValueError("--kv-bytes-per-token is needed: the router's nodes report "
                             + (f"different KV bytes per token ({sorted(sizes)})" if sizes
                                else "none (no node is registered)"))
        kv_bytes_per_token = sizes.pop()
    if kv_capacity_tokens is None:
        caps = sorted(f["kv_capacity_tokens"] for f in nodes.get("decode", {}).values()
                      if f.get("kv_capacity_tokens"))
        if caps:
            kv_capacity_tokens = caps[0]
            if caps[-1] != caps[0]:
                warnings.append(f"decode nodes hold {caps[0]}..{caps[-1]} tokens of KV: "
                                f"planned with the smallest, {caps[0]}")
    profile = Profile(
        prefill=(PrefillRates(tp=ptp, units_per_rank=pupr,
                              tokens_per_s=est[("prefill_tokens_per_s", "prefill")],
                              overhead_s=est[("prefill_overhead_s", "prefill")]),),
        decode=(DecodeRates(tp=dtp, units_per_rank=dupr,
                            step_base_s=est[("decode_step_base_s", "")],
                            step_per_seq_s=est[("decode_step_per_seq_s", "")],
                            prefill_tokens_per_s=est[("prefill_tokens_per_s", "decode")],
                            prefill_overhead_s=est[("prefill_overhead_s", "decode")],
                            kv_capacity_tokens=kv_capacity_tokens),),
        kv_bytes_per_token=kv_bytes_per_token,
        link_bytes_per_s=est[("link_bytes_per_s", "")],
        link_latency_s=est[("link_latency_s", "")],
        remote_overhead_s=est[("remote_overhead_s", "")], unit=unit, **limits)
    return profile, warnings


def profile_from_metrics(url: str, **kwargs) -> tuple[Profile, list[str]]:
    """:func:`profile_from_samples` over a running router's ``/metrics`` at ``url``."""
    samples = scrape(url)
    if samples is None:
        raise ValueError(f"{url} did not answer /metrics as a disagg router")
    return profile_from_samples(samples, **kwargs)
