"""Where a step's compute runs: the ranks, the model thread and the compute turn.

With TP 1 the engine's one :class:`ModelRunner` lives on a dedicated model
thread: its start-up and every step's compute (the model and sampling) run
there, so one thread owns the process's OpenMP team (a second team on the same
cores makes every step ~1.5x slower). With TP > 1 the ranks are worker
processes (:class:`TPWorkers`) and the model thread only waits on their pipes,
for overlapped steps. Engines on shared cores take turns at compute
(:class:`ComputeTurns`): a step with tokens to compute waits for its turn.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import torch

from disagg.config import EngineConfig
from disagg.engine.compute_turns import ComputeTurns
from disagg.engine.model_runner import ModelRunner
from disagg.engine.tp_worker import TPWorkers, threads_per_rank
from disagg.model import ModelConfig

T = TypeVar("T")


class Executor:
    """The engine's ranks (``runner`` with TP 1, ``workers`` with TP > 1) and how a step's
    compute is run on them."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path,
                 num_blocks: int, worker_factory) -> None:
        self.workers: TPWorkers | None = None
        self.runner: ModelRunner | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._shut_down = False
        #: True while an overlapped step's compute runs on the model thread
        self.model_running = False
        #: the turn lock shared with engines on the same cores (None: no turns)
        self.compute_turns = ComputeTurns(config.compute_turns, config.compute_turn_wait_s) \
            if config.compute_turns else None
        if config.tensor_parallel_size > 1:
            self.workers = TPWorkers(config, model_config, model_dir, num_blocks, worker_factory)
            infos = self.workers.wait_ready()
        else:
            def start_runner() -> ModelRunner:
                torch.set_num_threads(threads_per_rank(config))
                return ModelRunner(config, model_config, model_dir, num_blocks,
                                   worker_factory() if worker_factory else None)

            self.runner = self._model_thread.submit(start_runner).result()
            infos = [self.runner.handshake_info()]
        #: where each rank receives KV (decode role with a transport), else empty
        self.kv_endpoints: list[str] = [i["endpoint"] for i in infos if "endpoint" in i]

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """Rank 0's per-layer KV tensors (TP 1 only; for connectors and tests)."""
        if self.runner is None:
            raise RuntimeError("KV tensors live in the TP worker processes when TP > 1")
        return self.runner.kv_caches

    def execute(self, step) -> tuple[torch.Tensor | None, dict | None, list[dict]]:
        """Run ``step`` on the ranks: rank 0's logits and prompt logprobs, and every
        rank's KV report."""
        if self.workers is not None:
            return self.workers.execute(step)
        logits, plp = self.runner.execute(step)
        return logits, plp, [self.runner.kv_report(step.poll_timeout_s)]

    def run(self, compute: Callable[[], T], computes_tokens: bool,
            overlap: Callable[[Future], None] | None = None) -> T:
        """``compute()`` (a step's model run and sampling, calling :meth:`execute`), in this
        engine's turn when ``computes_tokens`` (a step that only polls KV transfers takes
        none). With ``overlap`` it runs on the model thread while ``overlap(future)`` runs
        on the caller's thread (``model_running`` is True meanwhile); otherwise on the
        model thread with TP 1 (which owns the OpenMP team), here with TP > 1."""
        def in_turn() -> T:
            if self.compute_turns is None or not computes_tokens:
                return compute()
            with self.compute_turns:
                return compute()

        if overlap is None:
            return self._model_thread.submit(in_turn).result() if self.runner is not None \
                else in_turn()
        self.model_running = True
        try:
            future = self._model_thread.submit(in_turn)
            try:
                overlap(future)
            finally:
                result = future.result()       # the model's own error wins over overlap's
        finally:
            self.model_running = False
        return result

    def shutdown(self) -> None:
        """Stop the TP worker processes, close the runner's KV links and the turn lock
        (idempotent)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if self.runner is not None and not self._shut_down:
            self._model_thread.submit(self.runner.close).result()
        self._model_thread.shutdown(wait=True)
        if self.compute_turns is not None and not self._shut_down:
            self.compute_turns.close()
        self._shut_down = True
