"""The per-step input every TP rank executes, built once by the driver.

It is plain data (lists of ints) so it crosses to the worker ranks as a
msgpack blob over a pipe, never pickled. Layout follows
:mod:`disagg.attention.base`: decode requests first, then prefill chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgpack

from disagg.engine.prompt_logprobs import step_spans


@dataclass
class StepInput:
    """Flattened tokens of one step plus what attention and sampling need."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    num_decodes: int
    logits_indices: list[int]          # rows of the flattened batch to sample from
    connector_meta: dict = field(default_factory=dict)
    # rows whose prompt logprobs rank 0 computes: [first_row, k, [target ids]]
    # (disagg.engine.prompt_logprobs)
    prompt_logprobs: list[list] = field(default_factory=list)
    return_argmax: bool = False        # every sampled row is greedy, no logprobs, no penalties
    poll_timeout_s: float = 0.0        # how long ranks may wait on KV links after the step

    def to_bytes(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "StepInput":
        return cls(**msgpack.unpackb(data, raw=False, strict_map_key=False))


def build_step_input(scheduled, block_size: int, connector_meta: dict | None = None) -> StepInput:
    """Lay out ``[(request, num_new_tokens), ...]`` (decodes first) as a StepInput.

    Returns the step and, implicitly through ``logits_indices``, which requests
    sample: those whose chunk reaches the end of their known tokens.
    """
    token_ids, positions, slots, qlens, slens, tables, logits_idx = [], [], [], [], [], [], []
    num_decodes = 0
    first_rows = []
    for req, n in scheduled:
        first_rows.append(len(token_ids))
        start = req.num_computed_tokens
        ids = req.block_ids
        token_ids.extend(req.token_ids[start:start + n])
        positions.extend(range(start, start + n))
        slots.extend(ids[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        qlens.append(n)
        slens.append(start + n)
        tables.append(ids)
        if n == 1:
            num_decodes += 1
        if start + n == req.num_tokens:
            logits_idx.append(len(token_ids) - 1)
    return StepInput(token_ids, positions, slots, qlens, slens, tables, num_decodes,
                     logits_idx, connector_meta or {},
                     prompt_logprobs=step_spans(scheduled, first_rows))
