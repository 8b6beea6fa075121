"""Load a model directory's safetensors into a TP-sharded model (directories are
found by :mod:`disagg.model.resolve`).

Checkpoint names are Hugging Face's; fused parameters take their parts through
``weight_loader(param, full_tensor, shard_id)``::

    model.layers.N.self_attn.{q,k,v}_proj.*   -> self_attn.qkv_proj.*  ("q", "k", "v")
    model.layers.N.mlp.{gate,up}_proj.weight  -> mlp.gate_up_proj.weight  (0, 1)
    lm_head.weight                            -> skipped when tied to the embedding
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from disagg.config import LOAD_FORMATS
from disagg.model.config import ModelConfig
from disagg.model.layers import default_weight_loader
from disagg.model.llama import LlamaForCausalLM

_FUSED = ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"),
          (".v_proj.", ".qkv_proj.", "v"), (".gate_proj.", ".gate_up_proj.", 0),
          (".up_proj.", ".gate_up_proj.", 1))
_PARTS = {".qkv_proj.": ("q", "k", "v"), ".gate_up_proj.": (0, 1)}


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor) for every tensor of the checkpoint."""
    for f in _safetensors_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def load_weights(model: LlamaForCausalLM, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Route every HF tensor to its parameter's loader; error on missing or unknown names."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, object]] = set()
    unexpected = []
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        target, shard = name, None
        for part, fused, shard_id in _FUSED:
            if part in name:
                target, shard = name.replace(part, fused), shard_id
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, shard)
        loaded.add((target, shard))
    missing = []
    for pname in params:
        fused = next((f for f in _PARTS if f in pname), None)
        parts = _PARTS[fused] if fused else (None,)
        missing += [f"{pname}[{p}]" if p is not None else pname
                    for p in parts if (pname, p) not in loaded]
    if unexpected or missing:
        raise ValueError(f"checkpoint does not match the {model.cfg.architecture} model: "
                         f"missing {missing or 'nothing'}; unexpected {unexpected or 'nothing'}")


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Deterministic random weights: N(0, 0.02) matrices, ones for norms, zeros for biases."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("bias"):
            p.data.zero_()
        elif p.dim() == 1:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def load_model(cfg: ModelConfig, model_dir: str | Path | None, dtype: torch.dtype,
               device: torch.device | str, load_format: str = "auto",
               max_positions: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    """Build the model for this TP rank on ``device`` in ``dtype`` and fill its weights.

    load_format: one of :data:`disagg.config.LOAD_FORMATS`: "auto" reads
    ``model_dir/*.safetensors``; "dummy" uses deterministic random weights
    (for speed benchmarks at real shapes).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose from {LOAD_FORMATS}")
    if not dtype.is_floating_point:
        raise ValueError(f"model dtype must be floating point, got {dtype}")
    device = torch.device(device)
    with torch.device(device), _default_dtype(dtype), torch.no_grad():
        model = LlamaForCausalLM(cfg, max_positions=max_positions)
    model.to(device)                                  # no-op unless built elsewhere
    with torch.no_grad():
        if load_format == "dummy":
            init_dummy_weights(model, seed)
        else:
            if model_dir is None:
                raise ValueError("load_model needs model_dir unless load_format='dummy'")
            load_weights(model, iter_safetensors(Path(model_dir)))
    return model.eval()
