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
from pathlib import Path

import torch

from disagg.config import EngineConfig
from disagg.connector.base import make_connector
from disagg.engine.block_manager import BlockManager
from disagg.engine.model_runner import ModelRunner, kv_block_bytes
from disagg.engine.outputs import KVLoadTarget, KVTransferEvent, RequestOutput
from disagg.engine.request import KVMode, Request, RequestStatus
from disagg.engine.sampler import Sampler, make_generator
from disagg.engine.scheduler import Scheduler
from disagg.engine.step_input import build_step_input
from disagg.engine.stop_strings import StopStringChecker
from disagg.engine.tp_worker import TPWorkers, threads_per_rank
from disagg.model import ModelConfig, resolve_model_dir
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
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_token_ids = _eos_token_ids(self.model_dir, self.model_config)
        sched_half, worker_factory = make_connector(config, self.model_config)
        self.workers: TPWorkers | None = None
        self.runner: ModelRunner | None = None
        if config.tensor_parallel_size > 1:
            self.workers = TPWorkers(config, self.model_config, self.model_dir, self.num_blocks,
                                     worker_factory)
            infos = self.workers.wait_ready()
        else:
            torch.set_num_threads(threads_per_rank(config))
            self.runner = ModelRunner(config, self.model_config, self.model_dir, self.num_blocks,
                                      worker_factory() if worker_factory else None)
            infos = [self.runner.handshake_info()]
        #: where each rank receives KV (decode role with a transport), else empty
        self.kv_endpoints: list[str] = [i["endpoint"] for i in infos if "endpoint" in i]
        self.kv_stats = {"bytes_sent": 0, "bytes_received": 0}
        self._kv_events: list[KVTransferEvent] = []
        self.scheduler = Scheduler(
            BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching),
            sched_half, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk, max_model_len=self.max_model_len,
            kv_load_timeout_s=config.kv_load_timeout_s, pin_lease_s=config.pin_lease_s)
        self.sampler = Sampler()
        self.stops = StopStringChecker(self.tokenizer) if self.tokenizer is not None else None
        self._stop_hits: dict[str, tuple[str, int]] = {}
        self._ids = itertools.count()
        self._pending: list[RequestOutput] = []   # finished outside step(), reported by it

    # ---- requests ---------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, kv_mode: KVMode | None = None,
                    kv_target: KVLoadTarget | dict | None = None) -> str:
        """Queue a request; bad input raises ``ValueError`` and changes nothing.

        ``kv_mode`` defaults from the role: a prefill engine runs every request
        prefill-only (hook 1); colocated and decode engines run them locally.
        ``kv_target`` (prefill role with a transport): the decode engine's
        :class:`KVLoadTarget` for this prompt; the KV is sent there as it is
        computed and the blocks are released once every rank's send ended.
        """
        if kv_mode is None:
            kv_mode = KVMode.PREFILL_ONLY if self.config.role == "prefill" else KVMode.LOCAL
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context length is "
                             f"{self.max_model_len}, leaving no room to generate")
        if -(-len(ids) // self.config.block_size) > self.num_blocks:
            raise ValueError(f"prompt of {len(ids)} tokens needs more KV blocks than the "
                             f"{self.num_blocks} this engine has (raise kv_cache_memory)")
        if params.stop and self.stops is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")
        if kv_target is not None:
            kv_target = self._check_kv_target(kv_target, len(ids), KVMode(kv_mode))
        gen = make_generator(params.seed, self.runner.device if self.runner else "cpu") \
            if not params.greedy else None
        req = Request(rid, ids, params, eos_token_ids=self.eos_token_ids, kv_mode=KVMode(kv_mode),
                      generator=gen, kv_target=kv_target)
        self.scheduler.add(req)
        return rid

    def _check_kv_target(self, target: KVLoadTarget | dict, num_tokens: int,
                         kv_mode: KVMode) -> KVLoadTarget:
        """Validate where a prefill-only request's KV goes (``ValueError`` on any mismatch)."""
        if isinstance(target, dict):
            target = KVLoadTarget.from_dict(target)
        if self.config.kv_transfer is None or kv_mode is not KVMode.PREFILL_ONLY:
            raise ValueError("kv_target needs a prefill-only request on an engine with a KV "
                             "transport (EngineConfig.kv_transfer)")
        nblk = -(-num_tokens // self.config.block_size)
        if target.num_tokens != num_tokens or len(target.block_ids) != nblk \
                or len(target.epochs) != nblk or not 0 <= target.num_local_tokens <= num_tokens:
            raise ValueError(f"kv_target does not fit this prompt: {num_tokens} tokens need "
                             f"{nblk} blocks, the target has {target.num_tokens} tokens, "
                             f"{len(target.block_ids)} blocks, {len(target.epochs)} epochs, "
                             f"{target.num_local_tokens} local tokens")
        if not target.request_id or not target.endpoints:
            raise ValueError("kv_target needs the decode request id and its ranks' endpoints")
        from transport.resharding import ReshardPlan
        ReshardPlan(self.model_config.num_kv_heads, self.config.tensor_parallel_size,
                    len(target.endpoints))             # the decode TP must fit the heads
        return target

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
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
        if not self.scheduler.connector.holds(request_id):
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._forget(request_id)
        return True

    def notify_kv_ready(self, request_id: str, first_token_id: int) -> None:
        """Hook 2: a LOAD_REMOTE request's first token, computed by the remote prefill.

        Without a KV transport this also says the reserved blocks hold the
        prompt's KV; with one, decoding starts once every rank received its
        blocks too. Raises ``KeyError`` if the request is not waiting (unknown,
        aborted, already notified, or fell back to local prefill after
        ``kv_load_timeout_s``).
        """
        req = self.scheduler.first_token_ready(request_id, first_token_id)
        if self._finish_if_stopped(req):       # e.g. max_tokens=1, or EOS first
            self._pending.append(self._output(req, [first_token_id]))

    def release_kv(self, request_id: str) -> bool:
        """Hook 1: unpin a finished prefill-only request's blocks; False if not pinned
        or a KV transfer still reads them (it releases them when it ends)."""
        req = self.scheduler.pinned.get(request_id)
        if req is None or self.scheduler.connector.holds(request_id):
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
        return True

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
        while a KV transport moves their blocks; otherwise they move only when
        ``notify_kv_ready`` / ``release_kv`` (or their timeout) moves them.
        """
        return self.scheduler.has_work() or bool(self._pending) \
            or self.scheduler.connector.has_pending()

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """Rank 0's per-layer KV tensors (TP 1 only; for connectors and tests)."""
        if self.runner is None:
            raise RuntimeError("KV tensors live in the TP worker processes when TP > 1")
        return self.runner.kv_caches

    # ---- the step ---------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, and report every request that moved."""
        sched = self.scheduler.schedule()
        outputs, self._pending = self._pending, []
        for req, target in sched.kv_loads:
            target.endpoints = list(self.kv_endpoints)
            outputs.append(self._output(req, [], kv_load=target))
        outputs += [self._output(req, []) for req in sched.finished]
        connector = self.scheduler.connector
        if not sched.scheduled and not connector.has_pending():
            return outputs
        meta = connector.build_metadata(sched.scheduled)
        step = build_step_input(sched.scheduled, self.config.block_size, meta.to_dict())
        if not sched.scheduled:
            step.poll_timeout_s = IDLE_POLL_S      # only KV transfers are moving: wait on them
        sampling = [req for req, n in sched.scheduled
                    if req.num_computed_tokens + n == req.num_tokens]
        step.return_argmax = all(r.params.greedy and r.params.logprobs is None for r in sampling)
        logits, reports = self._execute(step)
        sampled, logprobs = {}, {}
        if sampling:
            if step.return_argmax and self.workers is not None:
                token_ids, lps = logits.tolist(), [None] * len(sampling)
            else:
                out = self.sampler(logits, [r.params for r in sampling],
                                   [r.generator for r in sampling])
                token_ids, lps = out.token_ids, out.logprobs
            for req, tok, lp in zip(sampling, token_ids, lps):
                sampled[req.request_id], logprobs[req.request_id] = tok, lp
        for req in self.scheduler.postprocess(sched, sampled):
            lp = logprobs[req.request_id]
            self._finish_if_stopped(req)
            outputs.append(self._output(req, [req.token_ids[-1]], [lp] if lp else []))
        self._apply_kv_reports(reports)
        return outputs

    def _execute(self, step) -> tuple[torch.Tensor | None, list[dict]]:
        """Run ``step`` on the ranks: rank 0's logits and every rank's KV report."""
        if self.workers is not None:
            return self.workers.execute(step)
        logits = self.runner.execute(step)
        return logits, [self.runner.kv_report(step.poll_timeout_s)]

    def _apply_kv_reports(self, reports: list[dict]) -> None:
        """Start requests whose KV arrived; release blocks whose send ended."""
        for key in self.kv_stats:
            self.kv_stats[key] = sum(r.get(key, 0) for r in reports) or self.kv_stats[key]
        update = self.scheduler.connector.update(reports)
        for rid in update.received:
            self.scheduler.kv_received(rid)
            self._kv_events.append(KVTransferEvent(rid, "received"))
        for rid, error in update.sent:
            req = self.scheduler.pinned.get(rid)
            if req is not None:
                self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
            self._kv_events.append(KVTransferEvent(rid, "sent", error))

    def _finish_if_stopped(self, req: Request) -> bool:
        """Finish ``req`` if its newest token ends it; True when it did."""
        status = self.scheduler.check_stop(req) or self._check_stop_string(req)
        if status is not None:
            self.scheduler.finish(req, status)
        return status is not None

    def _check_stop_string(self, req: Request) -> RequestStatus | None:
        if not req.params.stop:
            return None
        hit = self.stops.check(req.request_id, req.output_token_ids, req.params.stop)
        if hit is None:
            return None
        self._stop_hits[req.request_id] = hit
        req.stop_reason = hit[0]
        return RequestStatus.FINISHED_STOPPED

    def _output(self, req: Request, new: list[int], logprobs=None, kv_load=None) -> RequestOutput:
        done = req.status.finished or req.status is RequestStatus.PINNED
        out = RequestOutput(req.request_id, new, req.output_token_ids, req.num_prompt_tokens,
                            max(req.num_cached_tokens, 0), finished=done,
                            logprobs=logprobs or [], kv_load=kv_load)
        if done:
            out.finish_reason = "length" if req.status is RequestStatus.PINNED else req.status.value
            out.stop_reason = req.stop_reason
            if req.status is RequestStatus.PINNED:
                out.kv_export = self.scheduler.kv_export(req)
            if self.stops is not None:
                out.text = self.stops.final_text(req.request_id, req.output_token_ids,
                                                 self._stop_hits.pop(req.request_id, None),
                                                 req.params.include_stop_str_in_output)
        return out

    def _forget(self, request_id: str) -> None:
        self._stop_hits.pop(request_id, None)
        if self.stops is not None:
            self.stops.forget(request_id)

    # ---- offline convenience ----------------------------------------------
    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion; final outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        shown = -1
        while len(final) < len(rids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
            if progress and len(final) != shown:
                shown = len(final)
                print(f"\r{shown}/{len(rids)} requests done", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return [final[r] for r in rids]

    def shutdown(self) -> None:
        """Stop the TP worker processes and close KV links (idempotent)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if self.runner is not None:
            self.runner.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _eos_token_ids(model_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (as transformers uses them)."""
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        import json
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))
