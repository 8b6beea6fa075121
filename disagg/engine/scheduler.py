"""Continuous batching: turn the request queues into one step's batch.

Each step has a token budget (``max_num_batched_tokens``). Running requests
are served first, in arrival order: a decode takes one token, a request still
prefilling takes the next chunk. Waiting requests are then admitted while the
budget, ``max_num_seqs`` and free blocks allow, their cached prefix skipped::

    budget 8 | r0 decode | r1 decode | r2 chunk (4) | r3 first chunk (2) |
             |    1      |    1      |     4        |        2           |

When a running request needs a block and none is free, the most recently
arrived running request is preempted: its blocks are freed and it goes back
to the front of the queue to be recomputed later (no request is lost).

Nothing waits forever: a request whose KV should come from outside falls
back to local prefill after ``kv_load_timeout_s``, and a prefill-only
request's pinned blocks are freed when ``pin_lease_s`` passes without a
release (unless a transfer still reads them: its own lease ends that).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from disagg.connector.base import KVConnectorScheduler
from disagg.engine.block_manager import BlockManager
from disagg.engine.outputs import KVExport, KVLoadTarget
from disagg.engine.request import KVMode, Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's batch: requests with the number of new tokens each computes."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)   # decodes first
    preempted: list[str] = field(default_factory=list)
    kv_loads: list[tuple[Request, KVLoadTarget]] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)   # ended by the scheduler itself

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Owns request queues and, through the block manager, their blocks."""

    def __init__(self, blocks: BlockManager, connector: KVConnectorScheduler, *,
                 max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_chunk: int | None, max_model_len: int,
                 kv_load_timeout_s: float = 30.0, pin_lease_s: float = 30.0) -> None:
        self.blocks = blocks
        self.connector = connector
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.chunk = max_prefill_chunk or max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.pinned: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.kv_load_timeout_s = kv_load_timeout_s
        self.pin_lease_s = pin_lease_s
        #: rid → tokens the step now running computes for it (empty between steps)
        self.in_flight: dict[str, int] = {}
        self.num_preemptions = 0            # totals, for stats and tests
        self.num_kv_load_timeouts = 0
        self.num_pin_expiries = 0

    # ---- queue management -------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_overdue(self, now: float) -> bool:
        """Whether a KV wait or a pin lease ran out (the next ``schedule`` acts on it)."""
        return any(r.deadline is not None and r.deadline <= now
                   for r in (*self.waiting_for_kv.values(), *self.pinned.values()))

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request and free its blocks (pins prefill-only requests instead)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.waiting_for_kv.pop(req.request_id, None)
        if req.kv_mode is KVMode.PREFILL_ONLY and status is not RequestStatus.FINISHED_ABORTED \
                and req.request_id not in self.pinned:
            req.status = RequestStatus.PINNED
            req.deadline = time.monotonic() + self.pin_lease_s
            self.pinned[req.request_id] = req
            self.connector.on_prefill_finished(req.request_id, req.block_ids)
            return
        req.status = status
        self.pinned.pop(req.request_id, None)
        self.blocks.free(req)
        self.requests.pop(req.request_id, None)
        self.connector.on_request_freed(req.request_id)

    def kv_export(self, req: Request) -> KVExport:
        """Hook 1: what a pinned prefill-only request exports."""
        n = req.num_prompt_tokens
        nblk = self.blocks.blocks_needed(n)
        hashes = self.blocks.update_hashes(req)[: n // self.blocks.block_size]
        return KVExport(block_ids=req.block_ids[:nblk], block_hashes=list(hashes),
                        epochs=[b.epoch for b in req.blocks[:nblk]], num_tokens=n,
                        first_token_id=req.token_ids[n])

    def first_token_ready(self, request_id: str, first_token_id: int) -> Request:
        """Hook 2: the remote prefill's first token; decoding starts once the KV is in too."""
        req = self.waiting_for_kv.get(request_id)
        if req is None or req.has_output:
            raise KeyError(f"request {request_id!r} is not waiting for its first token")
        req.append_token(first_token_id)
        if req.kv_received:
            self._start_remote(req)
        return req

    def fall_back(self, request_id: str) -> bool:
        """Give up on a request's remote KV and prefill it here; False if not waiting.

        The blocks go back to the pool (the connector cancels the load first),
        so a late transfer is rejected by epoch/unknown request, never written.
        A first token that already arrived stays: local prefill computes past it.
        """
        req = self.waiting_for_kv.pop(request_id, None)
        if req is None:
            return False
        self.connector.on_request_freed(request_id)
        req.kv_mode, req.deadline = KVMode.LOCAL, None
        self._requeue(req, RequestStatus.WAITING)
        return True

    def load(self) -> dict:
        """Queue and cache figures a node reports in heartbeats.

        The last four let anyone outside prove nothing leaked (all 0 once idle):
        ``num_requests``: requests held in any state (waiting, running, waiting for
        KV, pinned); ``num_used_blocks``: KV blocks held by requests (free blocks kept
        for the prefix cache not counted); ``num_pinned``: prefill-only requests whose
        blocks stay pinned until their KV send ends or is released; ``num_kv_sends``:
        requests whose KV send has not ended on every rank (the transport still pins
        their source blocks until the receiver acknowledges, or the lease runs out).
        ``num_preemptions`` is a running total (never decreases), for metrics.
        """
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        queued += sum(r.num_tokens - r.num_computed_tokens for r in self.running
                      if r.num_tokens - r.num_computed_tokens > 1)
        return {"queued_prefill_tokens": queued, "num_running": len(self.running),
                "num_waiting": len(self.waiting), "num_waiting_for_kv": len(self.waiting_for_kv),
                "num_pinned": len(self.pinned), "kv_usage": self.blocks.pool.usage,
                "num_requests": len(self.requests),
                "num_used_blocks": self.blocks.pool.num_used_blocks,
                "num_kv_sends": sum(1 for rid in self.requests if self.connector.holds(rid)),
                "num_preemptions": self.num_preemptions}

    def kv_received(self, request_id: str) -> None:
        """The connector delivered every block to every rank (ignored if it fell back meanwhile)."""
        req = self.waiting_for_kv.get(request_id)
        if req is None:
            return
        req.kv_received = True
        if req.has_output:
            self._start_remote(req)

    def _start_remote(self, req: Request) -> None:
        del self.waiting_for_kv[req.request_id]
        req.num_computed_tokens = req.num_prompt_tokens
        req.deadline = None
        req.kv_mode = KVMode.LOCAL             # from here on (preemption too) it is local
        self.blocks.cache_computed_blocks(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    # ---- the step ---------------------------------------------------------
    def expire(self, now: float, out: SchedulerOutput) -> None:
        """Fall back on overdue KV loads; free blocks whose pin lease ran out."""
        for req in [r for r in self.waiting_for_kv.values() if r.deadline <= now]:
            self.fall_back(req.request_id)
            self.num_kv_load_timeouts += 1
        for req in [r for r in self.pinned.values()
                    if r.deadline <= now and not self.connector.holds(r.request_id)]:
            self.finish(req, RequestStatus.FINISHED_LENGTH)
            self.num_pin_expiries += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.waiting_for_kv or self.pinned:
            self.expire(time.monotonic(), out)
        budget = self.budget
        scheduled: list[tuple[Request, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.chunk)
            if n <= 0:
                i += 1
                continue
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
                i += 1
        if not out.preempted:
            budget = self._admit(budget, scheduled, out)
        scheduled.sort(key=lambda rn: rn[1] != 1)        # decodes (1 token) first, stable
        out.scheduled = scheduled
        self.in_flight = {req.request_id: n for req, n in scheduled}
        return out

    def _admit(self, budget: int, scheduled: list, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            remote = req.kv_mode is KVMode.LOAD_REMOTE
            # prompt logprobs need the logits of every prompt position: no cache reuse
            prefix = [] if req.needs_prompt_logprobs else \
                self.blocks.match_prefix(req, leave_one=not remote)
            cached = len(prefix) * self.blocks.block_size
            if remote:
                if not self.blocks.allocate(req, req.num_tokens, prefix):
                    break
                out.kv_loads.append(self._start_load(req, cached))
                continue
            n = min(req.num_tokens - cached, budget, self.chunk)
            if not self.blocks.allocate(req, cached + n, prefix):
                if not self.running and not self.pinned and not self.waiting_for_kv:
                    # Alone with an empty pool and still no room: it outgrew the
                    # whole KV cache, so it can never continue.
                    self.waiting.popleft()
                    self.finish(req, RequestStatus.FINISHED_LENGTH)
                    out.finished.append(req)
                    continue
                break
            self.waiting.popleft()
            req.num_computed_tokens = cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
        return budget

    def reserve_loads(self) -> list[tuple[Request, KVLoadTarget]]:
        """Reserve blocks now for the remote-KV requests first in line (called between
        steps or while one runs, so their remote prefill need not wait for a step's
        admission).

        Only in arrival order, while ``max_num_seqs`` allows and the blocks fit
        beside those the running requests need for their next chunk (counted past
        the tokens a step now running computes: ``in_flight``), so no running
        request is preempted for them; the rest wait for ``schedule``.
        """
        loads: list[tuple[Request, KVLoadTarget]] = []
        blocks = self.blocks
        growth = 0
        for r in self.running:
            computed = r.num_computed_tokens + self.in_flight.get(r.request_id, 0)
            tokens = r.num_tokens + (computed == r.num_tokens)   # the step samples one more
            growth += max(0, blocks.blocks_needed(min(tokens, computed + self.chunk))
                          - len(r.blocks))
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.kv_mode is not KVMode.LOAD_REMOTE:
                break
            prefix = blocks.match_prefix(req, leave_one=False)
            needed = blocks.blocks_needed(req.num_tokens) - len(prefix) \
                + sum(1 for b in prefix if b.ref_count == 0)
            if needed + growth > blocks.num_free_blocks \
                    or not blocks.allocate(req, req.num_tokens, prefix):
                break
            loads.append(self._start_load(req, len(prefix) * blocks.block_size))
        return loads

    def _start_load(self, req: Request, cached: int) -> tuple[Request, KVLoadTarget]:
        """``req`` (first in line, its blocks allocated) now waits for its KV."""
        self.waiting.popleft()
        req.num_cached_tokens = cached
        req.status = RequestStatus.WAITING_FOR_KV
        req.deadline = time.monotonic() + self.kv_load_timeout_s
        self.waiting_for_kv[req.request_id] = req
        req.kv_received = not self.connector.receives_kv
        epochs = [b.epoch for b in req.blocks]
        target = KVLoadTarget(req.block_ids, epochs, cached, req.num_tokens, req.request_id)
        self.connector.on_blocks_allocated_for_load(req.request_id, req.block_ids, epochs, cached)
        return req, target

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._requeue(req, RequestStatus.PREEMPTED)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req.request_id)

    def _requeue(self, req: Request, status: RequestStatus) -> None:
        """Free a request's blocks and put it first in line to be computed again."""
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.status = status
        self.waiting.appendleft(req)

    def postprocess(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance scheduled requests; append sampled tokens; return those that got one."""
        got_token = []
        self.in_flight = {}
        for req, n in out.scheduled:
            if req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += n
            self.blocks.cache_computed_blocks(req)
            if req.request_id in sampled:
                req.append_token(sampled[req.request_id])
                got_token.append(req)
        return got_token

    def check_stop(self, req: Request) -> RequestStatus | None:
        """The finish status a request reached with its newest token, if any."""
        tok, p = req.token_ids[-1], req.params
        if req.kv_mode is KVMode.PREFILL_ONLY:
            return RequestStatus.FINISHED_LENGTH
        if not p.ignore_eos and tok in req.eos_token_ids:
            req.stop_reason = tok
            return RequestStatus.FINISHED_STOPPED
        if tok in p.stop_token_ids:
            req.stop_reason = tok
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
