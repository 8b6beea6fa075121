"""The Llama family as one model: Llama, SmolLM, Mistral, Qwen2, Qwen3.

The differences are three switches in :class:`~disagg.model.config.ModelConfig`:
Qwen2 has a bias on q/k/v, Qwen3 normalises each q and k head (RMSNorm over
``head_dim``) before RoPE, and some models tie lm_head to the embedding.

The batch is flattened (no batch dimension): ``T`` tokens from any number of
sequences, each with its position; the attention layers find the KV cache and
sequence boundaries in the forward context (:mod:`disagg.attention.layer`).
Residual structure and op order mirror Hugging Face so greedy outputs match::

    h = embed(ids)
    for layer:  h = h + attn(input_norm(h));  h = h + mlp(post_attn_norm(h))
    logits = lm_head(norm(h))

written as a residual stream, so each skip-connection add is fused with the
norm after it (one pass over the activations on the CPU kernels)::

    x, r = input_norm(embed(ids)), embed(ids)
    for layer:  x, r = post_attn_norm(attn(x), r)     # r += attn(x); x = norm(r)
                x, r = next_input_norm(mlp(x), r)     # r += mlp(x);  x = norm(r)

The per-op arithmetic lives in :mod:`disagg.kernels.ops` (C++ kernels on the
CPU, the PyTorch reference elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from disagg.attention.layer import PagedAttention
from disagg.distributed import get_tp_size
from disagg.kernels import ops
from disagg.model.config import ModelConfig
from disagg.model.layers import (MergedColumnParallelLinear, QKVParallelLinear,
                                 ReplicatedEmbedding, ReplicatedLinear, RMSNorm,
                                 RowParallelLinear, SiluAndMul)
from disagg.model.rope import RotaryEmbedding, default_max_positions


class LlamaAttention(nn.Module):
    """Self-attention over this rank's heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        tp = get_tp_size()
        self.num_heads = cfg.num_heads_per_rank(tp)
        self.num_kv_heads = cfg.num_kv_heads_per_rank(tp)
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary_emb = rotary_emb
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_kv_heads, cfg.head_dim,
                                   scale=cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """positions (T,), x (T, hidden) -> (T, hidden)."""
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)                                   # (T, (H + 2 Hkv) * D)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d,
                             self.num_kv_heads * d], dim=-1)
        q = q.view(t, self.num_heads, d)                         # (T, H, D)
        k = k.view(t, self.num_kv_heads, d)                      # (T, Hkv, D)
        v = v.view(t, self.num_kv_heads, d)                      # (T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)                                   # (T, H, D)
        return self.o_proj(o.reshape(t, self.num_heads * d))     # (T, hidden)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], bias=cfg.mlp_bias)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> (T, hidden)."""
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # (T, 2I/tp) -> (T, I/tp)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary_emb)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, hidden): the previous layer's output, not yet added to ``residual``
        (the skip stream; None before the first layer) -> (output, residual)."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)      # residual += h; norm
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm (HF's ``model.*`` parameters)."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = ReplicatedEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                                 cfg.max_position_embeddings)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids (T,), positions (T,) -> (T, hidden)."""
        h, residual = self.embed_tokens(input_ids), None          # (T, hidden)
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM, sharded over the current TP group.

    ``max_positions`` bounds the positions RoPE is precomputed for (default: the
    config's context length, times the factor for linear/dynamic scaling).
    """

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        tp = get_tp_size()
        cfg.validate_tp(tp)
        self.cfg = cfg
        self.num_heads = cfg.num_heads_per_rank(tp)
        self.num_kv_heads = cfg.num_kv_heads_per_rank(tp)
        self.head_dim = cfg.head_dim
        self.num_layers = cfg.num_layers
        self.model = LlamaModel(cfg, max_positions or default_max_positions(
            cfg.max_position_embeddings, cfg.rope_scaling))
        if not cfg.tie_word_embeddings:
            self.lm_head = ReplicatedLinear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids (T,), positions (T,) -> final hidden states (T, hidden)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden) -> full-vocabulary logits (N, vocab) in float32."""
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return ops.linear(hidden, w).float()
