"""A planner profile read from a running router's ``/metrics``.

Reads the same figures from a running router's
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

from disagg.planning.profile import DecodeRates, PrefillRates, Profile
from disagg.replay.server_metrics import Samples, scrape
from router.policy import MIN_PREDICTION_OBSERVATIONS


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
