"""Rotary position embedding (neox / rotate-half style, as in HF Llama).

``cos``/``sin`` are precomputed in fp32 for every position up to
``max_positions`` exactly as transformers computes them (``inv_freq`` on the
host, then ``pos * inv_freq``, ``cos`` and ``sin`` of the duplicated
frequencies, times the attention factor, on the model's device) and cast to the
activation dtype at use, so rotated q/k match HF bit for bit.

Scaling types (``rope_scaling["rope_type"]``):

* ``default`` – plain RoPE;  ``linear`` – frequencies divided by ``factor``;
* ``dynamic`` – NTK: past ``max_position_embeddings`` the base grows with the
  context length. HF recomputes the base from the longest position of each
  forward pass; here a token at position ``p`` uses the base for length
  ``p + 1``. That equals HF during decode and for prompts within
  ``max_position_embeddings``; a single prompt longer than that is rotated by HF
  with the base of its full length instead;
* ``llama3`` – Llama 3.1 band-wise smoothing;  ``yarn`` – YaRN ramp between
  interpolated and extrapolated frequencies, with ``cos``/``sin`` scaled by the
  attention factor (mscale) like HF.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from disagg.kernels import ops

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _plain_inv_freq(base: float, dim: int) -> torch.Tensor:
    """(dim/2,) fp32: ``1 / base ** (2i / dim)``."""
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (base ** exps)


def _llama3_inv_freq(base: float, dim: int, s: dict[str, Any]) -> torch.Tensor:
    inv_freq = _plain_inv_freq(base, dim)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(base: float, dim: int, s: dict[str, Any],
                   max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position_embeddings / orig
    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn_factor = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all)
                       if m and m_all else _yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:    # dim index that turns `rotations` times
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolate = 1 - ramp                            # 1 = keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


def _dynamic_short_inv_freq(base: float, dim: int, factor: float, max_pos_emb: int) -> torch.Tensor:
    """NTK-dynamic frequencies for contexts within ``max_pos_emb`` (HF's init values)."""
    return _plain_inv_freq(base * (factor * max_pos_emb / max_pos_emb - (factor - 1))
                           ** (dim / (dim - 2)), dim)


def _dynamic_freqs(base: float, dim: int, factor: float, max_pos_emb: int,
                   positions: torch.Tensor) -> torch.Tensor:
    """(P, dim/2) angles for NTK-dynamic RoPE, each position with its own base."""
    short = _dynamic_short_inv_freq(base, dim, factor, max_pos_emb)
    freqs = positions[:, None].float() * short[None, :]
    long_pos = positions[positions >= max_pos_emb]
    if long_pos.numel():                               # same fp32 ops as HF's runtime update
        seq_len = (long_pos + 1).to(torch.float32)
        bases = base * ((factor * seq_len / max_pos_emb) - (factor - 1)) ** (dim / (dim - 2))
        exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        inv = 1.0 / (bases[:, None] ** exps[None, :])
        freqs[positions >= max_pos_emb] = long_pos[:, None].float() * inv
    return freqs


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None,
                  max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) fp32, attention factor) for a static RoPE type.

    ``dynamic`` returns its frequencies for contexts within
    ``max_position_embeddings``.
    """
    s = rope_scaling or {"rope_type": "default"}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return _plain_inv_freq(base, head_dim), 1.0
    if kind == "linear":
        return _plain_inv_freq(base, head_dim) / s["factor"], 1.0
    if kind == "dynamic":
        return _dynamic_short_inv_freq(base, head_dim, s["factor"], max_position_embeddings), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(base, head_dim, s), 1.0
    return _yarn_inv_freq(base, head_dim, s, max_position_embeddings)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened q and k given each token's position."""

    def __init__(self, head_dim: int, max_positions: int, base: float,
                 rope_scaling: dict[str, Any] | None, max_position_embeddings: int) -> None:
        super().__init__()
        if max_positions <= 0:
            raise ValueError(f"max_positions must be positive, got {max_positions}")
        self.head_dim, self.max_positions = head_dim, max_positions
        s = rope_scaling or {"rope_type": "default"}
        device = torch.get_default_device()        # the model's device inside load_model
        with torch.device("cpu"):                  # frequencies on the host in fp32, like HF's init
            if s.get("rope_type") == "dynamic":
                pos = torch.arange(max_positions, dtype=torch.int64)
                freqs = _dynamic_freqs(base, head_dim, s["factor"], max_position_embeddings, pos)
                freqs, scale = freqs.to(device), 1.0
            else:
                inv_freq, scale = rope_inv_freq(head_dim, base, rope_scaling, max_position_embeddings)
        if s.get("rope_type") != "dynamic":        # angles and cos/sin on the device, like HF's forward
            pos = torch.arange(max_positions, dtype=torch.int64, device=device)
            freqs = pos[:, None].float() * inv_freq.to(device)[None, :]     # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                               # (P, D)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        self.attention_scaling = scale
        self.register_buffer("cos_cache", cos, persistent=False)   # (P, D) fp32
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,); q (T, H, D); k (T, H_kv, D) -> rotated q, k."""
        return ops.rotary(positions, q, k, self.cos_cache, self.sin_cache)


def default_max_positions(max_position_embeddings: int, rope_scaling: dict[str, Any] | None) -> int:
    """Positions to precompute: the config's length, times ``factor`` for linear/dynamic."""
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind in ("linear", "dynamic"):
        return int(max_position_embeddings * float(rope_scaling["factor"]))
    return max_position_embeddings
