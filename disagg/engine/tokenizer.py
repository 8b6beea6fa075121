"""The model directory's tokenizer and EOS ids, as the engine uses them."""

from __future__ import annotations

import json
from pathlib import Path

from disagg.model import ModelConfig


def load_tokenizer(model_dir: Path):
    """The HF tokenizer of ``model_dir``, or ``None`` when it ships none."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (as transformers uses them)."""
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))
