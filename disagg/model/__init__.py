"""The Llama-family model (Llama, SmolLM, Mistral, Qwen2, Qwen3), TP-sharded, and its loading.

Typical use::

    model_dir = resolve_model_dir("default")          # the embedded SmolLM2-135M-Instruct
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(cfg, model_dir, torch.float32, "cpu")
    with forward_context(ctx):                        # disagg.attention.layer
        hidden = model(input_ids, positions)          # (T,) -> (T, hidden)
    logits = model.compute_logits(hidden[last])       # (N, vocab) float32

The names below are imported on first use, so torch-free submodules
(:mod:`disagg.model.resolve`, :mod:`disagg.model.embedded`) can be imported by
a process that never loads torch (the router).
"""

from __future__ import annotations

import importlib

_HOMES = {"SUPPORTED_ARCHITECTURES": "disagg.model.config", "ModelConfig": "disagg.model.config",
          "ensure_embedded_model": "disagg.model.embedded",
          "LlamaForCausalLM": "disagg.model.llama", "load_model": "disagg.model.loader",
          "resolve_model_dir": "disagg.model.resolve", "RotaryEmbedding": "disagg.model.rope"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Import ``name`` from its module on first access (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
