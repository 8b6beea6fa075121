"""Heterogeneous tensor parallelism: which prefill rank sends which KV head where.

Rank ``r`` of TP degree ``t`` holds global KV heads (same rule as
``ModelConfig.kv_head_for_rank``)::

    t <= K:  heads r*K/t .. (r+1)*K/t - 1      (K/t heads per rank)
    t >  K:  the single head r*K // t          (heads replicated t/K times)

Every decode rank needs each of its heads from exactly one prefill rank: the
*lowest* prefill rank holding it, so a replicated head is sent once per decode
rank that needs it. Worked examples for SmolLM2 (K = 3 KV heads)::

    p=3 -> d=1   prefill  r0:[h0]  r1:[h1]  r2:[h2]
                 decode   q0:[h0 h1 h2]  <- h0 from r0 local 0, h1 from r1 local 0,
                                            h2 from r2 local 0  (3 senders, 1 head each)
    p=1 -> d=3   prefill  r0:[h0 h1 h2]
                 decode   q0:[h0] <- r0 local 0;  q1:[h1] <- r0 local 1;  q2:[h2] <- r0 local 2
    p=9 -> d=3   prefill  r0,r1,r2:[h0]  r3,r4,r5:[h1]  r6,r7,r8:[h2]   (replicated)
                 decode   q0:[h0] <- r0;  q1:[h1] <- r3;  q2:[h2] <- r6
                          ranks 1,2,4,5,7,8 send nothing
    p=1 -> d=9   prefill  r0:[h0 h1 h2]
                 decode   q0,q1,q2:[h0] <- r0 local 0;  q3,q4,q5:[h1] <- r0 local 1;
                          q6,q7,q8:[h2] <- r0 local 2

Inside one block of one layer (HND: ``[2, H, B, D]``) a head's K or V slice is
contiguous, so moving heads is a matter of offsets; :func:`gather_heads` and
:func:`scatter_heads` do the copies for whole block lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def kv_heads_of_rank(num_kv_heads: int, tp: int, rank: int) -> tuple[int, ...]:
    """Global KV heads that ``rank`` of TP degree ``tp`` holds, in cache order."""
    if num_kv_heads <= 0 or tp <= 0:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) and tp ({tp}) must be positive")
    if (num_kv_heads % tp if tp <= num_kv_heads else tp % num_kv_heads) != 0:
        raise ValueError(f"TP degree {tp} does not fit {num_kv_heads} KV heads: one must "
                         f"divide the other")
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
    if tp > num_kv_heads:
        return (rank * num_kv_heads // tp,)
    n = num_kv_heads // tp
    return tuple(range(rank * n, (rank + 1) * n))


@dataclass(frozen=True)
class HeadSource:
    """Global head ``head`` of a decode rank: from ``src_rank``'s local ``src_local``."""

    head: int
    src_rank: int
    src_local: int
    dst_local: int


@dataclass(frozen=True)
class ReshardPlan:
    """The head mapping from prefill TP ``p`` to decode TP ``d`` (see module doc)."""

    num_kv_heads: int
    p: int
    d: int
    sources: tuple[tuple[HeadSource, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for tp in (self.p, self.d):
            kv_heads_of_rank(self.num_kv_heads, tp, 0)  # validates
        owner: dict[int, tuple[int, int]] = {}
        for r in reversed(range(self.p)):  # lowest rank wins
            for local, g in enumerate(kv_heads_of_rank(self.num_kv_heads, self.p, r)):
                owner[g] = (r, local)
        sources = []
        for q in range(self.d):
            heads = kv_heads_of_rank(self.num_kv_heads, self.d, q)
            sources.append(tuple(HeadSource(g, *owner[g], j) for j, g in enumerate(heads)))
        object.__setattr__(self, "sources", tuple(sources))

    def pairs(self, src_rank: int, dst_rank: int) -> list[tuple[int, int]]:
        """What prefill ``src_rank`` sends decode ``dst_rank``: ``(src local, dst local)`` heads."""
        if not (0 <= src_rank < self.p and 0 <= dst_rank < self.d):
            raise ValueError(f"ranks ({src_rank}, {dst_rank}) outside p={self.p}, d={self.d}")
        return [(s.src_local, s.dst_local) for s in self.sources[dst_rank] if s.src_rank == src_rank]

    def dst_ranks(self, src_rank: int) -> list[int]:
        """Decode ranks that prefill ``src_rank`` must send to (may be empty)."""
        return [q for q in range(self.d) if self.pairs(src_rank, q)]

    def src_ranks(self, dst_rank: int) -> list[int]:
        """Prefill ranks decode ``dst_rank`` receives from."""
        return sorted({s.src_rank for s in self.sources[dst_rank]})


def gather_heads(layer: torch.Tensor, block_ids: list[int], src_heads: list[int],
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``layer[block_ids][:, :, src_heads]`` into one contiguous tensor.

    ``layer`` is ``(num_blocks, 2, H, B, D)``; the result is ``(n, 2, h, B, D)``.
    """
    idx = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
    blocks = layer.index_select(0, idx)                            # (n, 2, H, B, D)
    if src_heads != list(range(layer.shape[2])):
        blocks = blocks.index_select(2, torch.tensor(src_heads, device=layer.device))
    if out is None:
        return blocks.contiguous()
    return out.copy_(blocks)


def scatter_heads(layer: torch.Tensor, block_ids: list[int], dst_heads: list[int],
                  src: torch.Tensor) -> None:
    """Write ``src`` ``(n, 2, h, B, D)`` into ``layer[block_ids][:, :, dst_heads]``."""
    n = len(block_ids)
    if dst_heads == list(range(layer.shape[2])):
        b0 = block_ids[0]
        if list(block_ids) == list(range(b0, b0 + n)):
            layer[b0:b0 + n].copy_(src)                            # one contiguous span
            return
    idx = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
    for i, h in enumerate(dst_heads):
        layer[idx, :, h] = src[:, :, i]                            # (n, 2, B, D) per head


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """Split paired block ids into ``(src start, dst start, length)`` runs that are
    consecutive on both sides (a fresh pool gives one run per request)."""
    runs: list[list[int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int],
                heads: list[tuple[int, int]]) -> None:
    """Copy blocks of one layer pool to another directly, head pairs ``(src, dst)``.

    One ``copy_`` per consecutive run (and per head when re-sharding), with no
    intermediate buffer: what a receiver reading a peer's shared pool does.
    """
    all_heads = [h for h, _ in heads] == list(range(src.shape[2])) == [h for _, h in heads] \
        and src.shape[2] == dst.shape[2]
    for s, d, n in block_runs(src_ids, dst_ids):
        if all_heads:
            dst[d:d + n].copy_(src[s:s + n])                        # (n, 2, H, B, D)
        else:
            for sh, dh in heads:
                dst[d:d + n, :, dh].copy_(src[s:s + n, :, sh])      # (n, 2, B, D)
