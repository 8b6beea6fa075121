"""How a one-machine deployment's two nodes share the cores (``disagg serve``, and
the conditional series of ``disagg experiment``).

The router is never pinned. The usable cores are split between the nodes, in
proportion to their TP degrees (prefill gets the lower cores, rounded down,
decode the rest), when that leaves each node at least ``MIN_CORES_PER_RANK``
cores per TP rank; on a smaller machine (2 cores) the nodes are not pinned and
share every core, taking turns at compute (``disagg.engine.compute_turns``).
Either way the nodes report their CPU sets at registration, so the router's
cost model knows when a remote prefill competes with the decode node for its
cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.cpus import format_cpus, parse_cpus

MIN_CORES_PER_RANK = 2     # fewer, and a node's loop / ZeroMQ / heartbeat threads fight its compute


@dataclass(frozen=True)
class Layout:
    """The cores a deployment's nodes are pinned to (``None`` = not pinned: every
    usable core) out of ``usable``."""

    usable: tuple[int, ...]
    prefill: tuple[int, ...] | None
    decode: tuple[int, ...] | None

    def __post_init__(self) -> None:
        for role in ("prefill", "decode"):
            pinned = getattr(self, role)
            if pinned is not None and (not pinned or not set(pinned) <= set(self.usable)):
                raise ValueError(f"{role} cores {pinned} must be a non-empty subset of the "
                                 f"usable cores {self.usable}")

    def cores(self, role: str) -> tuple[int, ...]:
        """The cores ``role`` ("router", "prefill", "decode") may run on."""
        pinned = {"router": None, "prefill": self.prefill, "decode": self.decode}[role]
        return self.usable if pinned is None else pinned

    def shared(self) -> tuple[int, ...]:
        """The cores both nodes may run on."""
        return tuple(sorted(set(self.cores("prefill")) & set(self.cores("decode"))))

    def node_args(self, role: str) -> tuple[str, ...]:
        """The ``--cpus`` flag for ``role``'s node (none when not pinned)."""
        pinned = self.prefill if role == "prefill" else self.decode
        return () if pinned is None else ("--cpus", format_cpus(pinned))

    def describe(self, turns: bool = True) -> list[str]:
        """One line per process with its cores, then what the nodes share (and, with
        ``turns``, that nodes sharing cores take turns at compute, as on CPUs)."""
        lines = []
        for role, name in (("router", "router"), ("prefill", "prefill-0"), ("decode", "decode-0")):
            pinned = role != "router" and getattr(self, role) is not None
            lines.append(f"{name:<9} cores {format_cpus(self.cores(role))}"
                         f"{'' if pinned else ' (not pinned)'}")
        shared = self.shared()
        if shared:
            lines.append(f"nodes share cores {format_cpus(shared)}: "
                         f"{'they take turns at compute, and ' if turns else ''}the router's "
                         "cost model knows (a remote prefill there pays the decode node's load "
                         "and queue: mostly local)")
        else:
            lines.append("nodes on disjoint cores: a remote prefill does not slow the decode node")
        return lines


def _cpus_flag(flag: str, text: str | None, usable: tuple[int, ...]) -> tuple[int, ...] | None | str:
    """A ``--*-cpus`` value: its cores, None for "all", or "unset"."""
    if text is None:
        return "unset"
    if text.strip() == "all":
        return None
    cores = parse_cpus(text)
    if not cores <= set(usable):
        raise ValueError(f"{flag} {text}: cores {format_cpus(cores - set(usable))} are not "
                         f"usable here (usable: {format_cpus(usable)})")
    return tuple(sorted(cores))


def plan_layout(usable, prefill_tp: int = 1, decode_tp: int = 1, prefill_cpus: str | None = None,
                decode_cpus: str | None = None) -> Layout:
    """Which cores each node gets (the rule is in the module docstring; ``ValueError``
    for a flag naming unusable cores, or leaving the other node none)."""
    usable = tuple(sorted(set(usable)))
    for name, tp in (("prefill_tp", prefill_tp), ("decode_tp", decode_tp)):
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"{name} must be an int >= 1, got {tp!r}")
    pre = _cpus_flag("--prefill-cpus", prefill_cpus, usable)
    dec = _cpus_flag("--decode-cpus", decode_cpus, usable)
    if pre == "unset" and dec == "unset":
        n_pre = len(usable) * prefill_tp // (prefill_tp + decode_tp)
        if (n_pre >= MIN_CORES_PER_RANK * prefill_tp
                and len(usable) - n_pre >= MIN_CORES_PER_RANK * decode_tp):
            return Layout(usable, usable[:n_pre], usable[n_pre:])
        return Layout(usable, None, None)
    if pre == "unset" or dec == "unset":        # one given: the other gets what it leaves
        given, flag = (dec, "--decode-cpus") if pre == "unset" else (pre, "--prefill-cpus")
        rest = None if given is None else tuple(c for c in usable if c not in given)
        if rest == ():
            raise ValueError(f"{flag} takes every usable core, none left for the other node")
        pre, dec = (rest, given) if pre == "unset" else (given, rest)
    return Layout(usable, pre, dec)
