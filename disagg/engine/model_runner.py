"""One TP rank's model, KV cache and attention backend (nano-vllm's ModelRunner).

Every rank owns a shard of the weights and the KV heads it is responsible
for; all ranks run :meth:`ModelRunner.execute` on the same :class:`StepInput`.
Only rank 0 returns logits: the driver samples and broadcasts nothing back,
because the sampled tokens come back in the next step's input.
"""

from __future__ import annotations

from pathlib import Path

import torch

from disagg.attention import make_backend
from disagg.attention.base import AttentionMetadata
from disagg.attention.layer import ForwardContext, forward_context
from disagg.config import EngineConfig
from disagg.distributed import get_tp_rank, get_tp_size
from disagg.engine import prompt_logprobs
from disagg.engine.step_input import StepInput
from disagg.kernels import ops
from disagg.model import ModelConfig, load_model


def kv_block_bytes(model_cfg: ModelConfig, config: EngineConfig) -> int:
    """Bytes one KV block takes on one rank, over all layers."""
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    tp = config.tensor_parallel_size
    return (model_cfg.num_layers * 2 * model_cfg.num_kv_heads_per_rank(tp)
            * config.block_size * model_cfg.head_dim * itemsize)


def _column_major_lm_head(model: torch.nn.Module) -> None:
    """Store the lm_head weight column-major (same shape, transposed strides).

    ``F.linear(x, w)`` then runs as ``x @ w.T`` on a contiguous ``w.T``, which
    CPU BLAS streams about twice as fast when ``x`` has one row (measured on
    the 2-core machine: SmolLM2's lm_head at batch 1, 10.7 ms -> 5.3 ms; the
    decode step 66 -> 62 ms). Doing the same for every linear made batch-8
    steps 50 % slower, so only the head, whose GEMV dominates at batch 1.
    """
    w = model.model.embed_tokens.weight if model.cfg.tie_word_embeddings else model.lm_head.weight
    w.data = w.data.t().contiguous().t()


class ModelRunner:
    """Holds the device state of one rank and executes steps on it."""

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, model_dir: Path | None,
                 num_blocks: int, connector_worker=None) -> None:
        self.config = config
        self.rank, self.tp = get_tp_rank(), get_tp_size()
        self.device = torch.device(config.device if config.device == "cpu" or self.tp == 1
                                   else f"cuda:{self.rank}")
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            ops.use_cpu_kernels(config.cpu_kernels)
        self.model = load_model(model_cfg, model_dir, dtype=config.torch_dtype, device=self.device,
                                load_format=config.load_format)
        if self.device.type == "cpu" and config.dtype == "float32" and ops.cpu_kernels() is None:
            _column_major_lm_head(self.model)   # the kernels stream row-major weights instead
        heads = model_cfg.num_heads_per_rank(self.tp)
        kv_heads = model_cfg.num_kv_heads_per_rank(self.tp)
        shape = (num_blocks, 2, kv_heads, config.block_size, model_cfg.head_dim)   # HND
        self.connector = connector_worker
        caches = connector_worker.make_kv_caches(model_cfg.num_layers, shape, config.torch_dtype,
                                                 self.device) if connector_worker else None
        self.kv_caches = caches or [torch.zeros(shape, dtype=config.torch_dtype, device=self.device)
                                    for _ in range(model_cfg.num_layers)]   # one per layer
        self.backend = make_backend(config.attention_backend, num_heads=heads,
                                    num_kv_heads=kv_heads, head_dim=model_cfg.head_dim,
                                    block_size=config.block_size, dtype=config.torch_dtype,
                                    device=self.device)
        if connector_worker is not None:
            connector_worker.register_kv_caches(self.kv_caches)

    def _metadata(self, step: StepInput) -> AttentionMetadata:
        qsl = [0]
        for n in step.query_lens:
            qsl.append(qsl[-1] + n)
        width = max(len(t) for t in step.block_tables)
        tables = torch.zeros(len(step.block_tables), width, dtype=torch.int32)
        for i, t in enumerate(step.block_tables):
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32),
            block_tables=tables, num_decodes=step.num_decodes,
            query_lens_cpu=step.query_lens, seq_lens_cpu=step.seq_lens,
            block_size=self.config.block_size)
        return meta if self.device.type == "cpu" else meta.to(self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> tuple[torch.Tensor | None, dict | None]:
        """Run one forward pass; rank 0 returns (len(logits_indices), vocab) fp32
        logits and the step's prompt logprobs (:func:`prompt_logprobs.compute`).

        A step without tokens only hands the connector its metadata (a KV
        transfer can progress while nothing is scheduled). Other ranks, and
        steps without such rows, return None for either.
        """
        if self.connector is not None:
            from disagg.connector.base import KVConnectorMetadata
            self.connector.bind_metadata(KVConnectorMetadata.from_dict(step.connector_meta))
        if not step.token_ids:
            return None, None
        ids = torch.tensor(step.token_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(step.positions, dtype=torch.int64, device=self.device)
        meta = self._metadata(step)
        self.backend.plan(meta)
        ctx = ForwardContext(attn_meta=meta, kv_caches=self.kv_caches, backend=self.backend,
                             connector=self.connector)
        with forward_context(ctx):
            hidden = self.model(ids, pos)                               # (T, hidden)
        if self.connector is not None:
            self.connector.wait_for_save()
        if self.rank != 0:
            return None, None
        plp = prompt_logprobs.compute(self.model.compute_logits, hidden, step.prompt_logprobs)
        if not step.logits_indices:
            return None, plp
        idx = torch.tensor(step.logits_indices, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[idx]).float(), plp      # (N, vocab)

    def kv_report(self, timeout_s: float = 0.0) -> dict:
        """The connector's report of transfers that ended (empty without a connector)."""
        return self.connector.get_finished(timeout_s) if self.connector is not None else {}

    def handshake_info(self) -> dict:
        """What the driver must know about this rank's connector (e.g. its KV endpoint)."""
        return self.connector.handshake_info() if self.connector is not None else {}

    def close(self) -> None:
        """Release the connector's sockets and shared memory."""
        if self.connector is not None:
            self.connector.close()
            self.connector = None
