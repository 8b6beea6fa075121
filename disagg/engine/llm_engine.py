"""The engine: one step is schedule → run → postprocess (nano-vllm's shape).

The same class serves every role. A prefill node submits requests with
``kv_mode=KVMode.PREFILL_ONLY`` and exports their pinned blocks; a decode
node submits ``KVMode.LOAD_REMOTE`` requests, fills the reserved blocks from
outside and calls :meth:`LLMEngine.notify_kv_ready`; a colocated engine does
neither.
"""

from __future__ import annotations

import itertools
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from disagg.config import EngineConfig
from disagg.connector.factory import make_connector
from disagg.connector.transfer_scheduler import check_kv_target
from disagg.engine import prompt_logprobs
from disagg.engine.block_manager import BlockManager
from disagg.engine.executor import Executor
from disagg.engine.model_runner import kv_block_bytes
from disagg.engine.output_processor import OutputProcessor
from disagg.engine.outputs import KVLoadTarget, KVTransferEvent, RequestOutput
from disagg.engine.penalties import TokenHistory
from disagg.engine.request import KVMode, Request, RequestStatus
from disagg.engine.sampler import Sampler, make_generator
from disagg.engine.scheduler import Scheduler
from disagg.engine.step_input import build_step_input
from disagg.model import ModelConfig, resolve_model_dir
from disagg.model.tokenizer import ModelTokenizer, eos_token_ids
from disagg.sampling_params import SamplingParams

IDLE_POLL_S = 0.005     # a step with only KV transfers in flight waits this long on the links


class LLMEngine:
    """A paged-KV, continuously batching LLM engine with optional TP ranks."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir: Path = resolve_model_dir(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.model_config.validate_tp(config.tensor_parallel_size)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.num_blocks = config.num_kv_blocks or config.kv_cache_memory // kv_block_bytes(
            self.model_config, config)
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of "
                             f"{kv_block_bytes(self.model_config, config)} bytes")
        #: the model directory's tokenizer (None when it ships no ``tokenizer.json``)
        self.tokenizer = ModelTokenizer.from_dir(self.model_dir) \
            if (self.model_dir / "tokenizer.json").is_file() else None
        self.eos_token_ids = eos_token_ids(self.model_dir, self.model_config.eos_token_ids)
        sched_half, worker_factory = make_connector(config, self.model_config)
        #: the ranks, the model thread and the compute turn (disagg.engine.executor)
        self.executor = Executor(config, self.model_config, self.model_dir, self.num_blocks,
                                 worker_factory)
        self.kv_stats = {"bytes_sent": 0, "bytes_received": 0}
        self._kv_events: list[KVTransferEvent] = []
        self.scheduler = Scheduler(
            BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching),
            sched_half, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk, max_model_len=self.max_model_len,
            kv_load_timeout_s=config.kv_load_timeout_s, pin_lease_s=config.pin_lease_s)
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.scheduler, self.tokenizer)
        self._ids = itertools.count()
        self._pending: list[RequestOutput] = []   # finished outside step(), reported by it
        #: the last step's (prefill tokens, decode sequences), for nodes' step timings
        self.last_step_tokens: tuple[int, int] = (0, 0)

    # ---- requests ---------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, kv_mode: KVMode | None = None,
                    kv_target: KVLoadTarget | dict | None = None,
                    resume_token_ids: list[int] | None = None) -> str:
        """Queue a request; bad input raises ``ValueError`` and changes nothing.

        ``kv_mode`` defaults from the role: a prefill engine runs every request
        prefill-only (hook 1); colocated and decode engines run them locally.
        ``kv_target`` (prefill role with a transport): the decode engine's
        :class:`KVLoadTarget` for this prompt; the KV is sent there as it is
        computed and the blocks are released once every rank's send ended.
        ``resume_token_ids``: output the request already has (it was migrated from
        another engine); it starts with them as its output and prefills prompt +
        them, as after a preemption, so ``max_tokens``, penalties, stop strings and
        ``output_token_ids`` count them and the final ``text`` covers them. Only for
        local requests without ``prompt_logprobs``.
        """
        if kv_mode is None:
            kv_mode = KVMode.PREFILL_ONLY if self.config.role == "prefill" else KVMode.LOCAL
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        resume = self._check_resume(resume_token_ids or [], params, KVMode(kv_mode))
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context length is "
                             f"{self.max_model_len}, leaving no room to generate")
        if resume and len(ids) + len(resume) >= self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) and resumed output ({len(resume)}) "
                             f"reach the context length {self.max_model_len}")
        total = len(ids) + len(resume)
        if -(-total // self.config.block_size) > self.num_blocks:
            raise ValueError(f"prompt of {total} tokens needs more KV blocks than the "
                             f"{self.num_blocks} this engine has (raise kv_cache_memory)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has no "
                             "tokenizer.json")
        vocab = self.model_config.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:     # sorted by id
            raise ValueError(f"logit_bias token ids must be integers in [0, {vocab})")
        if params.needs_local_prefill and KVMode(kv_mode) is KVMode.LOAD_REMOTE:
            raise ValueError("prompt_logprobs needs the prompt prefilled here: a request whose "
                             "KV comes from a remote prefill cannot return them")
        if kv_target is not None:
            if self.config.kv_transfer is None or KVMode(kv_mode) is not KVMode.PREFILL_ONLY:
                raise ValueError("kv_target needs a prefill-only request on an engine with a KV "
                                 "transport (EngineConfig.kv_transfer)")
            kv_target = check_kv_target(kv_target, len(ids), self.config.block_size,
                                        self.model_config.num_kv_heads,
                                        self.config.tensor_parallel_size)
        gen = make_generator(params.seed, self.executor.runner.device if self.executor.runner else "cpu") \
            if not params.greedy else None
        req = Request(rid, ids, params, eos_token_ids=self.eos_token_ids, kv_mode=KVMode(kv_mode),
                      generator=gen, kv_target=kv_target, resume_token_ids=resume)
        self.scheduler.add(req)
        return rid

    def _check_resume(self, resume: list[int], params: SamplingParams,
                      kv_mode: KVMode) -> list[int]:
        """``resume_token_ids`` checked against the request (``ValueError``), as a list."""
        if not resume:
            return []
        vocab = self.model_config.vocab_size
        if not isinstance(resume, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
                for t in resume):
            raise ValueError(f"resume token ids must be integers in [0, {vocab})")
        if kv_mode is not KVMode.LOCAL:
            raise ValueError(f"a resumed request runs locally (prefilling prompt + resumed "
                             f"output here); kv_mode {kv_mode.value} cannot resume")
        if params.prompt_logprobs is not None:
            raise ValueError("a resumed request cannot return prompt_logprobs (its first "
                             "part already did)")
        if len(resume) >= params.max_tokens:
            raise ValueError(f"{len(resume)} resumed tokens leave nothing to generate under "
                             f"max_tokens={params.max_tokens}")
        return list(resume)

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (this model directory has no "
                                 "tokenizer.json); pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if unknown.

        Blocks a KV transfer still reads are freed when that transfer ends.
        """
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self._not_while_model_runs("abort_request")
        if not self.scheduler.connector.holds(request_id):
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.outputs.forget(request_id)
        return True

    def abort_all(self, match: Callable[[str], bool] | None = None) -> list[str]:
        """Abort every request this engine holds whose id ``match`` accepts (all when
        ``None``) as :meth:`abort_request` does, drop their outputs not yet reported,
        and return their ids. A node calls it when a router restarted or dropped it:
        nobody is left to read those requests' tokens."""
        rids = [rid for rid in self.scheduler.requests if match is None or match(rid)]
        for rid in rids:
            self.abort_request(rid)
        self._pending = [out for out in self._pending
                         if not (match is None or match(out.request_id))]
        return rids

    def is_idle(self) -> bool:
        """Whether the engine holds nothing: no request in any state (waiting, running,
        waiting for KV, pinned), no output to report, no KV transfer in flight."""
        return not self.scheduler.requests and not self.has_unfinished()

    def notify_kv_ready(self, request_id: str, first_token_id: int) -> None:
        """Hook 2: a LOAD_REMOTE request's first token, computed by the remote prefill.

        Without a KV transport this also says the reserved blocks hold the
        prompt's KV; with one, decoding starts once every rank received its
        blocks too. Raises ``KeyError`` if the request is not waiting (unknown,
        aborted, already notified, or fell back to local prefill after
        ``kv_load_timeout_s``).
        """
        self._not_while_model_runs("notify_kv_ready")
        req = self.scheduler.first_token_ready(request_id, first_token_id)
        if self.outputs.finish_if_stopped(req):       # e.g. max_tokens=1, or EOS first
            self._pending.append(self.outputs.build(req, [first_token_id]))

    def release_kv(self, request_id: str) -> bool:
        """Hook 1: unpin a finished prefill-only request's blocks; False if not pinned
        or a KV transfer still reads them (it releases them when it ends)."""
        self._not_while_model_runs("release_kv")
        req = self.scheduler.pinned.get(request_id)
        if req is None or self.scheduler.connector.holds(request_id):
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
        return True

    def fall_back_to_local(self, request_id: str) -> bool:
        """Stop waiting for a LOAD_REMOTE request's KV and prefill it here (the remote
        prefill failed or its node died); False if the request is not waiting."""
        self._not_while_model_runs("fall_back_to_local")
        return self.scheduler.fall_back(request_id)

    def reserve_kv_loads(self) -> list[RequestOutput]:
        """Reserve blocks now for the LOAD_REMOTE requests first in line; their outputs
        carry the :class:`KVLoadTarget` (``kv_load``), so the remote prefill can start
        without waiting for the next step to admit them.

        Call between steps, or from a step's ``overlap`` while the model runs (the
        blocks kept for the running requests' next chunk count the tokens that step
        is computing). The next ``step()`` tells the ranks to expect the KV; a rank
        keeps blocks that arrive before that for a grace period instead of
        rejecting them (``transport.pending``). Requests that do not fit beside the
        running ones wait for a step as before.
        """
        return [self._kv_load_output(req, target) for req, target in self.scheduler.reserve_loads()]

    def _kv_load_output(self, req: Request, target: KVLoadTarget) -> RequestOutput:
        target.endpoints = list(self.executor.kv_endpoints)
        return self.outputs.build(req, [], kv_load=target)

    def load(self) -> dict:
        """Queued prefill tokens, running/waiting counts and KV usage (for heartbeats)."""
        return self.scheduler.load()

    def pop_kv_events(self) -> list[KVTransferEvent]:
        """KV transfers that ended since the last call (with a KV transport)."""
        events, self._kv_events = self._kv_events, []
        return events

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Hook 3: hashes of the leading full blocks of ``token_ids`` cached here."""
        return self.scheduler.blocks.cached_prefix_blocks(list(token_ids))

    def has_unfinished(self) -> bool:
        """Whether ``step()`` has work to do or outputs to report.

        Requests waiting for remote KV or pinned after a prefill count only
        while a KV transport moves their blocks, or once their timeout passed
        (a step then falls back / frees them); otherwise they move only when
        ``notify_kv_ready`` / ``release_kv`` moves them.
        """
        return self.scheduler.has_work() or bool(self._pending) \
            or self.scheduler.connector.has_pending() \
            or self.scheduler.has_overdue(time.monotonic())

    def _not_while_model_runs(self, what: str) -> None:
        """Refuse a call that may free blocks while a step's model run reads them."""
        if self.executor.model_running:
            raise RuntimeError(f"{what} may free KV blocks the model is computing on; call it "
                               f"between steps, not from a step's overlap")

    # ---- the step ---------------------------------------------------------
    def step(self, overlap: Callable[[Future], None] | None = None) -> list[RequestOutput]:
        """Schedule, run the model, sample, and report every request that moved.

        ``overlap`` (a node's control loop): when the step runs the model, the
        model runs on the engine's model thread and ``overlap(future)`` is called
        on this thread meanwhile; it must return once ``future`` is done. While
        it runs, only admissions are allowed (:meth:`add_request`,
        :meth:`reserve_kv_loads`): what frees blocks (abort, fall back, release,
        a first token) raises ``RuntimeError`` and waits for the step's end.
        """
        sched = self.scheduler.schedule()
        decodes = sum(1 for req, n in sched.scheduled
                      if n == 1 and req.has_output and req.num_computed_tokens + 1 == req.num_tokens)
        self.last_step_tokens = (sum(n for _, n in sched.scheduled) - decodes, decodes)
        outputs, self._pending = self._pending, []
        outputs += [self._kv_load_output(req, target) for req, target in sched.kv_loads]
        outputs += [self.outputs.build(req, []) for req in sched.finished]
        connector = self.scheduler.connector
        if not sched.scheduled and not connector.has_pending():
            return outputs
        meta = connector.build_metadata(sched.scheduled)
        step = build_step_input(sched.scheduled, self.config.block_size, meta.to_dict())
        if not sched.scheduled:
            step.poll_timeout_s = IDLE_POLL_S      # only KV transfers are moving: wait on them
        sampling = [req for req, n in sched.scheduled
                    if req.num_computed_tokens + n == req.num_tokens]
        step.return_argmax = all(r.params.greedy and r.params.logprobs is None
                                 and not r.params.has_penalties for r in sampling)
        plp, reports, token_ids, lps = self.executor.run(
            lambda: self._compute(step, sampling), bool(step.token_ids), overlap)
        prompt_logprobs.record(sched.scheduled, plp)
        sampled, logprobs = {}, {}
        for req, tok, lp in zip(sampling, token_ids, lps):
            sampled[req.request_id], logprobs[req.request_id] = tok, lp
        for req in self.scheduler.postprocess(sched, sampled):
            lp = logprobs[req.request_id]
            self.outputs.finish_if_stopped(req)
            outputs.append(self.outputs.build(req, [req.token_ids[-1]], [lp] if lp else []))
        self._apply_kv_reports(reports)
        return outputs

    def _compute(self, step, sampling: list[Request]):
        """The compute of a step: run the model, then sample the next token of each
        request in ``sampling``. Returns (prompt logprobs, KV reports, token ids,
        logprobs), the last two in ``sampling``'s order."""
        logits, plp, reports = self.executor.execute(step)
        if not sampling:
            return plp, reports, [], []
        if step.return_argmax and self.executor.workers is not None:
            return plp, reports, logits.tolist(), [None] * len(sampling)
        histories = [TokenHistory(r.token_ids, r.num_prompt_tokens)
                     if r.params.has_penalties else None for r in sampling]
        out = self.sampler(logits, [r.params for r in sampling],
                           [r.generator for r in sampling], histories)
        return plp, reports, out.token_ids, out.logprobs

    def _apply_kv_reports(self, reports: list[dict]) -> None:
        """Start requests whose KV arrived; release blocks whose send ended."""
        if reports and "bytes_sent" in reports[0]:      # cumulative per rank, so sum them
            for key in self.kv_stats:
                self.kv_stats[key] = sum(r[key] for r in reports)
        update = self.scheduler.connector.update(reports)
        for rid in update.received:
            self.scheduler.kv_received(rid)
            self._kv_events.append(KVTransferEvent(rid, "received"))
        for rid, error in update.sent:
            req = self.scheduler.pinned.get(rid)
            if req is not None:
                self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
            self._kv_events.append(KVTransferEvent(rid, "sent", error))

    # ---- offline convenience ----------------------------------------------
    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion; final outputs in prompt order, each
        carrying every logprob and the prompt logprobs of its request."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {r: [] for r in rids}
        prompt_lps: dict[str, list | None] = {}
        shown = -1
        while len(final) < len(rids):
            for out in self.step():
                if out.request_id not in logprobs:      # added before this call
                    continue
                logprobs[out.request_id] += out.logprobs
                if out.prompt_logprobs is not None:
                    prompt_lps[out.request_id] = out.prompt_logprobs
                if out.finished:
                    out.logprobs = logprobs[out.request_id]
                    out.prompt_logprobs = prompt_lps.get(out.request_id)
                    final[out.request_id] = out
            if progress and len(final) != shown:
                shown = len(final)
                print(f"\r{shown}/{len(rids)} requests done", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return [final[r] for r in rids]

    def shutdown(self) -> None:
        """Stop the TP worker processes and close KV links (idempotent)."""
        self.executor.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
