"""Pure-PyTorch paged attention: the CPU backend and the GPU reference.

Decode sequences are attended in one padded batch; prefill chunks one at a time
with a bottom-right-aligned causal mask (see :mod:`disagg.attention.base`).

Gathering is the expensive part on a CPU. One block of one layer is
``[2, H_kv, block_size, D]``, so viewing the layer's cache as rows of
``[block_size, D]`` — row ``(block * 2 + kv) * H_kv + head`` — lets a single
``index_select`` produce K (or V) already in SDPA's ``(B, H_kv, L, D)`` order,
with no permute copy. The row indices and masks depend only on the step, so
:meth:`TorchPagedAttention.plan` builds them once for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from disagg.attention.base import AttentionBackend, AttentionMetadata, write_kv


def kv_row_index(block_tables: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Row ids of K for ``block_tables`` (B, n) in the ``[rows, bs, D]`` view.

    Returns (B, H_kv, n) int64; V rows are the same plus ``num_kv_heads``.
    """
    base = block_tables.long() * (2 * num_kv_heads)                       # (B, n)
    heads = torch.arange(num_kv_heads, device=block_tables.device)
    return base[:, None, :] + heads[None, :, None]                          # (B, H_kv, n)


def gather_kv(kv_cache: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather K and V for ``rows`` from :func:`kv_row_index`.

    kv_cache (N, 2, H_kv, bs, D) -> k, v each (B, H_kv, n * bs, D)
    """
    _, _, h, bs, d = kv_cache.shape
    flat = kv_cache.view(-1, bs, d)
    b, _, n = rows.shape
    k = torch.index_select(flat, 0, rows.reshape(-1)).view(b, h, n * bs, d)
    v = torch.index_select(flat, 0, (rows + h).reshape(-1)).view(b, h, n * bs, d)
    return k, v


@dataclass
class _Plan:
    decode_rows: torch.Tensor | None          # (B_d, H_kv, n)
    decode_mask: torch.Tensor | None          # (B_d, 1, 1, n * bs) bool
    prefix_rows: dict[int, torch.Tensor]      # seq index -> (1, H_kv, n)
    prefix_masks: dict[int, torch.Tensor]     # seq index -> (q_len, seq_len) bool


class TorchPagedAttention(AttentionBackend):
    """Reference paged attention built from ``scaled_dot_product_attention``."""

    name = "torch"
    _plan: _Plan | None = None
    _planned: AttentionMetadata | None = None

    #: whether decode rows are gathered into a padded batch (subclasses with an
    #: in-place decode kernel turn this off and skip planning the gather)
    gathers_decodes = True

    def plan(self, meta: AttentionMetadata) -> None:
        bs, nd, dev = self.block_size, meta.num_decodes, meta.block_tables.device
        decode_rows = decode_mask = None
        if nd and self.gathers_decodes:
            n = -(-max(meta.seq_lens_cpu[:nd]) // bs)
            decode_rows = kv_row_index(meta.block_tables[:nd, :n], self.num_kv_heads)
            keys = torch.arange(n * bs, device=dev)
            decode_mask = (keys[None, :] < meta.seq_lens[:nd, None])[:, None, None, :]
        rows, masks = {}, {}
        for i in range(nd, meta.num_seqs):
            q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            if q_len == seq_len:
                continue                          # no cached prefix: plain causal attention
            n = -(-seq_len // bs)
            rows[i] = kv_row_index(meta.block_tables[i:i + 1, :n], self.num_kv_heads)
            q_pos = torch.arange(q_len, device=dev)[:, None] + (seq_len - q_len)
            masks[i] = torch.arange(seq_len, device=dev)[None, :] <= q_pos  # bottom-right causal
        self._plan = _Plan(decode_rows, decode_mask, rows, masks)
        self._planned = meta

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if self._planned is not meta:
            self.plan(meta)
        self.write(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self.attend_decodes(q[:nd], kv_cache, meta, scale)
        self.attend_prefills(q, k, v, kv_cache, meta, scale, out)
        return out

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Store the step's new K/V rows in their cache slots."""
        write_kv(kv_cache, k, v, slot_mapping)

    def attend_decodes(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       scale: float) -> torch.Tensor:
        """q (B_d, H, D), one query per decode sequence -> (B_d, H, D)."""
        kc, vc = gather_kv(kv_cache, self._plan.decode_rows)                 # (B, H_kv, L, D)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc,            # q: (B, H, 1, D)
                                           attn_mask=self._plan.decode_mask, scale=scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.squeeze(2)

    def attend_prefills(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float,
                        out: torch.Tensor) -> None:
        """Prefill chunks one at a time into ``out`` (rows after the decodes)."""
        plan, gqa = self._plan, self.num_heads != self.num_kv_heads
        pos = meta.num_decodes
        for i in range(meta.num_decodes, meta.num_seqs):
            q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            qi = q[pos:pos + q_len].transpose(0, 1).unsqueeze(0)            # (1, H, q_len, D)
            if i in plan.prefix_rows:
                kc, vc = gather_kv(kv_cache, plan.prefix_rows[i])
                o = F.scaled_dot_product_attention(qi, kc[:, :, :seq_len], vc[:, :, :seq_len],
                                                   attn_mask=plan.prefix_masks[i], scale=scale,
                                                   enable_gqa=gqa)
            else:
                ki = k[pos:pos + q_len].transpose(0, 1).unsqueeze(0)        # (1, H_kv, T, D)
                vi = v[pos:pos + q_len].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                   enable_gqa=gqa)
            out[pos:pos + q_len] = o[0].transpose(0, 1)                      # (q_len, H, D)
            pos += q_len
