"""Pure-PyTorch paged attention: the CPU backend and the GPU reference.

Decode sequences are attended in one padded batch; prefill chunks one at a time
with a bottom-right-aligned causal mask (see :mod:`disagg.attention.base`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disagg.attention.base import AttentionBackend, AttentionMetadata, write_kv


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather whole blocks into contiguous K and V.

    block_ids: (B, n) -> k, v: (B, H, n * block_size, D)
    """
    g = kv_cache[block_ids]                       # (B, n, 2, H, bs, D)
    b, n, _, h, bs, d = g.shape
    k = g[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, h, n * bs, d)
    v = g[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, h, n * bs, d)
    return k, v


class TorchPagedAttention(AttentionBackend):
    """Reference paged attention built from ``scaled_dot_product_attention``."""

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta, scale)
        pos = nd
        for i in range(nd, meta.num_seqs):
            q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            qi = q[pos:pos + q_len]
            if q_len == seq_len:                  # nothing cached: attend the new K/V
                out[pos:pos + q_len] = self._causal(qi, k[pos:pos + q_len], v[pos:pos + q_len], scale)
            else:
                out[pos:pos + q_len] = self._prefix(qi, kv_cache, meta, i, scale)
            pos += q_len
        return out

    def _decode(self, q: torch.Tensor, kv_cache, meta: AttentionMetadata, scale: float):
        nd = q.shape[0]
        max_len = max(meta.seq_lens_cpu[:nd])
        n_blocks = -(-max_len // self.block_size)
        kc, vc = gather_kv(kv_cache, meta.block_tables[:nd, :n_blocks])     # (B, H, L, D)
        keys = torch.arange(n_blocks * self.block_size, device=q.device)
        mask = keys[None, :] < meta.seq_lens[:nd, None]                     # (B, L)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), kc, vc, attn_mask=mask[:, None, None, :],       # q: (B, Hq, 1, D)
            scale=scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o.squeeze(2)                                                  # (B, Hq, D)

    def _causal(self, q, k, v, scale):
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),  # (1, H, T, D)
            v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return o[0].transpose(0, 1)                                           # (T, Hq, D)

    def _prefix(self, q, kv_cache, meta: AttentionMetadata, i: int, scale: float):
        q_len, seq_len = q.shape[0], meta.seq_lens_cpu[i]
        n_blocks = -(-seq_len // self.block_size)
        kc, vc = gather_kv(kv_cache, meta.block_tables[i:i + 1, :n_blocks])
        kc, vc = kc[:, :, :seq_len], vc[:, :, :seq_len]                      # (1, H, L, D)
        rows = torch.arange(q_len, device=q.device)[:, None] + (seq_len - q_len)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= rows       # bottom-right causal
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), kc, vc, attn_mask=mask, scale=scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return o[0].transpose(0, 1)
