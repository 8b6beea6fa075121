"""A discrete-event simulation of one deployment serving one workload.

::

    disaggregated   arrival ─▶ prefill node ──(first token)──▶ client
                                  │ KV over the link (per prefill node, one at a time)
                                  ▼
                               decode node: continuous batching ──▶ tokens 2..n
    colocated       arrival ─▶ decode node: prompt chunks and decodes in the same steps

Every node runs one step at a time; a step's length comes from the profile
(:mod:`disagg.planning.profile`) and its results (tokens, finished chunks) count
at its end. Work that arrives during a step waits for the next one, as in the
engine. The clock jumps from event to event (a heap ordered by time, then by
insertion, so runs are deterministic).

Assumptions, and where the real system differs:

- **Routing** (at arrival, as the router does): the prefill node with the
  fewest prompt tokens still to compute, the decode node with the fewest
  unfinished requests routed to it; ties go to the lowest index. The
  disaggregated deployment prefills every prompt remotely (``--policy remote``);
  the cost-model policy's per-request choice is not simulated.
- **Prefill node**: each step takes waiting prompts first come, first served,
  up to ``max_batched_tokens`` tokens (a longer prompt spans several steps) and
  lasts ``overhead_s + tokens / tokens_per_s``. A prompt's first token is out
  at the end of its last chunk, plus ``remote_overhead_s``: that is its TTFT.
- **KV transfer** starts when the prompt's prefill ends; a prefill node sends
  one request's KV at a time, ``link_latency_s + input tokens ×
  kv_bytes_per_token / link_bytes_per_s`` each. (The engine sends layer by
  layer during the last chunk; the router's link fit measures the part not
  hidden behind compute.) The decode node's second token waits for it.
- **Decode node**: a request joins at a step boundary, first come first
  served, when fewer than ``max_num_seqs`` run and the node's KV has room for
  its whole prompt + output, reserved at once, so nothing is ever preempted
  (the engine allocates blocks as tokens come and preempts when they run out).
  A request larger than a node's whole KV is never served and misses its SLO.
  A step gives every decoding request one token and lasts ``step_base_s +
  step_per_seq_s · batch + step_per_context_token_s · context tokens``.
- **Colocated decode node**: requests join waiting for their prefill; a step
  gives each decoding request one token and fills the rest of the
  ``max_batched_tokens`` budget with prompt chunks (first come, first served);
  with any prompt tokens it lasts ``prefill_overhead_s + (prompt tokens +
  decodes) / prefill_tokens_per_s`` (how the router calibrates such a step), so
  a long prompt stalls every running decode, as it does on the engine.
- No prefix caching (every prompt is computed in full), no failures, no
  router admission limit or early rejection.
- TTFT = first token − arrival; TPOT = (last token − first token) / (output
  − 1), as the replay computes them; a one-token request has no TPOT and
  meets any TPOT bound.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from disagg.planning.profile import DecodeRates, PrefillRates, Profile


@dataclass(frozen=True)
class SimRequest:
    """One request: arrival time (s) and token counts (both >= 1)."""

    arrival_s: float
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"a request needs >= 1 input and output token, got "
                             f"{self.input_tokens} / {self.output_tokens}")


@dataclass(frozen=True)
class Workload:
    """A trace's requests at a mean rate of 1 req/s: ``unit_arrivals_s`` sorted,
    starting at 0, with ``(n - 1) / last == 1``; ``lengths`` are ``(input, output)``."""

    unit_arrivals_s: tuple[float, ...]
    lengths: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.unit_arrivals_s) < 2 or len(self.lengths) != len(self.unit_arrivals_s):
            raise ValueError("a workload needs at least 2 requests, one length pair each")
        if list(self.unit_arrivals_s) != sorted(self.unit_arrivals_s) \
                or self.unit_arrivals_s[-1] <= 0:
            raise ValueError("unit_arrivals_s must be sorted and span a positive time")

    @classmethod
    def constant(cls, n: int, input_tokens: int, output_tokens: int) -> Workload:
        """``n`` identical requests, evenly spaced."""
        return cls(tuple(float(i) for i in range(n)), ((input_tokens, output_tokens),) * n)

    @classmethod
    def poisson(cls, lengths: list[tuple[int, int]], seed: int) -> Workload:
        """Poisson arrivals (exponential gaps from ``seed``) for ``lengths``, in order,
        rescaled to a mean rate of exactly 1 req/s."""
        gaps = np.random.default_rng(seed).exponential(1.0, len(lengths) - 1)
        times = np.concatenate([[0.0], np.cumsum(gaps)])
        return cls(tuple((times * ((len(times) - 1) / times[-1])).tolist()), tuple(lengths))

    def at_rate(self, rate: float) -> list[SimRequest]:
        """The requests with arrivals scaled to a mean of ``rate`` req/s."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        return [SimRequest(t / rate, i, o) for t, (i, o) in zip(self.unit_arrivals_s, self.lengths)]


@dataclass(frozen=True)
class Deployment:
    """``num_decode`` decode nodes of shape ``decode`` and ``num_prefill`` prefill
    nodes of shape ``prefill`` (none: colocated, decode nodes prefill locally)."""

    decode: DecodeRates
    num_decode: int
    prefill: PrefillRates | None = None
    num_prefill: int = 0

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"num_decode must be >= 1, got {self.num_decode}")
        if (self.prefill is None) != (self.num_prefill == 0) or self.num_prefill < 0:
            raise ValueError("give a prefill shape exactly when num_prefill >= 1")
        if self.colocated and not self.decode.can_prefill:
            raise ValueError(f"decode shape {self.decode.label} has no local prefill rate: "
                             "it cannot serve colocated")

    @property
    def colocated(self) -> bool:
        """No prefill pool: decode nodes prefill their own prompts."""
        return self.num_prefill == 0

    @property
    def compute(self) -> int:
        """Compute units the deployment takes."""
        return self.num_decode * self.decode.units + \
            (self.num_prefill * self.prefill.units if self.prefill else 0)

    @property
    def label(self) -> str:
        """E.g. ``2P tp1 + 1D tp1x2`` or ``colocated 2D tp1``."""
        dec = f"{self.num_decode}D {self.decode.label}"
        return f"colocated {dec}" if self.colocated else \
            f"{self.num_prefill}P {self.prefill.label} + {dec}"


@dataclass(frozen=True)
class SimResult:
    """Per request (workload order): TTFT and TPOT in seconds (TTFT None: never
    served; TPOT None: fewer than 2 tokens or never served)."""

    ttft_s: tuple[float | None, ...]
    tpot_s: tuple[float | None, ...]

    def attainment(self, ttft_slo_s: float | None, tpot_slo_s: float | None) -> float:
        """Share of requests served within both bounds (None = not checked)."""
        met = sum(ttft is not None and (ttft_slo_s is None or ttft <= ttft_slo_s)
                  and (tpot_slo_s is None or tpot is None or tpot <= tpot_slo_s)
                  for ttft, tpot in zip(self.ttft_s, self.tpot_s))
        return met / len(self.ttft_s)

    def p90(self, which: str) -> float | None:
        """The 90th percentile of ``"ttft"`` or ``"tpot"`` over requests that have one."""
        values = [v for v in (self.ttft_s if which == "ttft" else self.tpot_s) if v is not None]
        return float(np.percentile(values, 90)) if values else None


class _Clock:
    """The event heap: ``at(t, fn, *args)`` runs ``fn(t, *args)`` at time ``t``."""

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def run(self) -> None:
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            fn(t, *args)


class _Seq:
    """A request on a decode node: prompt tokens still to prefill here, tokens out so far."""

    __slots__ = ("rid", "prefill_left", "tokens_out", "context", "need")

    def __init__(self, rid: int, req: SimRequest, prefilled: bool) -> None:
        self.rid = rid
        self.prefill_left = 0 if prefilled else req.input_tokens
        self.tokens_out = 1 if prefilled else 0
        self.context = req.input_tokens + self.tokens_out if prefilled else 0
        self.need = req.input_tokens + req.output_tokens     # KV tokens reserved at admission


class _Simulation:
    """One run: the nodes, the clock and each request's first and last token times."""

    def __init__(self, dep: Deployment, profile: Profile, requests: list[SimRequest]) -> None:
        self.dep, self.profile, self.requests = dep, profile, requests
        self.clock = _Clock()
        self.first = [None] * len(requests)
        self.last = [None] * len(requests)
        self.decoders = [_DecodeNode(self, dep.decode) for _ in range(dep.num_decode)]
        self.prefillers = [_PrefillNode(self, dep.prefill) for _ in range(dep.num_prefill)]
        self.decoder_of: list[_DecodeNode | None] = [None] * len(requests)

    def run(self) -> SimResult:
        for rid, req in enumerate(self.requests):
            self.clock.at(req.arrival_s, self.arrive, rid)
        self.clock.run()
        ttft, tpot = [], []
        for req, first, last in zip(self.requests, self.first, self.last):
            ttft.append(None if first is None else first - req.arrival_s)
            tpot.append(None if last is None or req.output_tokens < 2
                        else (last - first) / (req.output_tokens - 1))
        return SimResult(tuple(ttft), tuple(tpot))

    def arrive(self, t: float, rid: int) -> None:
        req = self.requests[rid]
        cap = self.dep.decode.kv_capacity_tokens
        if cap is not None and req.input_tokens + req.output_tokens > cap:
            return                                  # never fits a decode node: never served
        dec = min(self.decoders, key=lambda n: n.assigned)      # first of the least loaded
        dec.assigned += 1
        self.decoder_of[rid] = dec
        if self.dep.colocated:
            dec.join(t, rid, prefilled=False)
        else:
            min(self.prefillers, key=lambda n: n.tokens_left).submit(t, rid)

    def first_token(self, t: float, rid: int) -> None:
        self.first[rid] = t
        if self.requests[rid].output_tokens == 1:
            self.finish(t, rid)

    def finish(self, t: float, rid: int) -> None:
        self.last[rid] = t
        self.decoder_of[rid].assigned -= 1

    def prefilled(self, t: float, rid: int, node: _PrefillNode) -> None:
        """A remote prefill ended: first token to the client, KV on to the decode node."""
        req = self.requests[rid]
        self.first_token(t + self.profile.remote_overhead_s, rid)
        if req.output_tokens == 1:
            return
        start = max(t, node.link_free_s)
        node.link_free_s = start + self.profile.transfer_s(req.input_tokens)
        self.clock.at(node.link_free_s, self.decoder_of[rid].join, rid, True)


class _PrefillNode:
    """Chunked FCFS prefill steps over its queue of ``[rid, tokens left]``."""

    def __init__(self, sim: _Simulation, rates: PrefillRates) -> None:
        self.sim, self.rates = sim, rates
        self.queue: deque[list[int]] = deque()
        self.tokens_left = 0          # prompt tokens routed here not yet computed (its load)
        self.busy = False
        self.link_free_s = 0.0        # when its last KV send ends

    def submit(self, t: float, rid: int) -> None:
        n = self.sim.requests[rid].input_tokens
        self.queue.append([rid, n])
        self.tokens_left += n
        if not self.busy:
            self._step(t)

    def _step(self, t: float) -> None:
        budget = self.sim.profile.max_batched_tokens
        chunks = []
        for item in self.queue:
            if budget == 0:
                break
            n = min(item[1], budget)
            chunks.append((item, n))
            budget -= n
        self.busy = bool(chunks)
        if chunks:
            tokens = sum(n for _, n in chunks)
            self.sim.clock.at(t + self.rates.step_s(tokens), self._step_done, chunks)

    def _step_done(self, t: float, chunks) -> None:
        for item, n in chunks:
            item[1] -= n
            self.tokens_left -= n
            if item[1] == 0:            # finished prompts are a prefix of the queue
                self.queue.popleft()
                self.sim.prefilled(t, item[0], self)
        self._step(t)


class _DecodeNode:
    """Continuous batching: admission at step boundaries, decodes first, prompt chunks
    (colocated only) in the rest of the token budget."""

    def __init__(self, sim: _Simulation, rates: DecodeRates) -> None:
        self.sim, self.rates = sim, rates
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.kv_used = 0
        self.assigned = 0            # unfinished requests routed here (its load)
        self.busy = False

    def join(self, t: float, rid: int, prefilled: bool) -> None:
        self.waiting.append(_Seq(rid, self.sim.requests[rid], prefilled))
        if not self.busy:
            self._step(t)

    def _admit(self) -> None:
        cap = self.rates.kv_capacity_tokens
        while self.waiting and len(self.running) < self.sim.profile.max_num_seqs:
            seq = self.waiting[0]
            if cap is not None and self.kv_used + seq.need > cap:
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.kv_used += seq.need

    def _step(self, t: float) -> None:
        self._admit()
        self.busy = bool(self.running)
        if not self.running:
            return
        decoding = [s for s in self.running if not s.prefill_left]
        budget = self.sim.profile.max_batched_tokens - len(decoding)
        chunks = []
        for seq in self.running:
            if seq.prefill_left and budget > 0:
                n = min(seq.prefill_left, budget)
                chunks.append((seq, n))
                budget -= n
        prompt_tokens = sum(n for _, n in chunks)
        context = sum(s.context for s in decoding)
        dt = self.rates.step_s(len(decoding), context, prompt_tokens)
        self.sim.clock.at(t + dt, self._step_done, decoding, chunks)

    def _step_done(self, t: float, decoding: list[_Seq], chunks) -> None:
        done = []
        for seq in decoding:
            seq.tokens_out += 1
            seq.context += 1
            if seq.tokens_out == self.sim.requests[seq.rid].output_tokens:
                done.append(seq)
                self.sim.finish(t, seq.rid)
        for seq, n in chunks:
            seq.prefill_left -= n
            seq.context += n
            if not seq.prefill_left:
                seq.tokens_out, seq.context = 1, seq.context + 1
                self.sim.first_token(t, seq.rid)
                if self.sim.requests[seq.rid].output_tokens == 1:
                    done.append(seq)
        for seq in done:
            self.running.remove(seq)
            self.kv_used -= seq.need
        self._step(t)


def simulate(dep: Deployment, profile: Profile, requests: list[SimRequest]) -> SimResult:
    """Play ``requests`` through ``dep`` with ``profile``'s figures (module docstring)."""
    if not requests:
        raise ValueError("nothing to simulate: no requests")
    return _Simulation(dep, profile, requests).run()
