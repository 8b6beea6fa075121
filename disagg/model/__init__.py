"""The Llama-family model (Llama, SmolLM, Mistral, Qwen2, Qwen3), TP-sharded, and its loading.

Typical use::

    model_dir = resolve_model_dir("default")          # the embedded SmolLM2-135M-Instruct
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(cfg, model_dir, torch.float32, "cpu")
    with forward_context(ctx):                        # disagg.attention.layer
        hidden = model(input_ids, positions)          # (T,) -> (T, hidden)
    logits = model.compute_logits(hidden[last])       # (N, vocab) float32
"""

from __future__ import annotations

from disagg.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from disagg.model.embedded import ensure_embedded_model
from disagg.model.llama import LlamaForCausalLM
from disagg.model.loader import load_model, resolve_model_dir
from disagg.model.rope import RotaryEmbedding

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaForCausalLM", "ModelConfig", "RotaryEmbedding",
           "ensure_embedded_model", "load_model", "resolve_model_dir"]
