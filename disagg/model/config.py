"""The model's shape, read from a Hugging Face ``config.json``.

One frozen :class:`ModelConfig` describes every supported Llama-family model
(Llama, Mistral, Qwen2, Qwen3; SmolLM is a Llama) and answers the tensor-parallel
questions the engine asks: which TP degrees are valid, how many heads each rank
holds, which global KV heads a rank owns, and how many KV-cache bytes a token
costs on one rank.

KV heads when ``tp > num_kv_heads`` are *replicated*: with 2 KV heads and TP 4,
ranks 0,1 hold KV head 0 and ranks 2,3 hold KV head 1::

    query heads  | q0 q1 | q2 q3 | q4 q5 | q6 q7 |      8 heads, TP 4
    rank         |   0   |   1   |   2   |   3   |
    KV head      |   0   |   0   |   1   |   1   |      rank r owns r * 2 // 4
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM",
                           "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the old or the transformers-5 layout.

    transformers 5 stores ``rope_parameters = {"rope_theta", "rope_type", ...}``;
    older configs have a top-level ``rope_theta`` and ``rope_scaling`` with
    ``type`` or ``rope_type``. The returned scaling dict always has ``rope_type``
    and is ``None`` for plain RoPE.
    """
    params = dict(d.get("rope_parameters") or {})
    params.update(d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only full-width RoPE)")
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings",
                          d.get("original_max_position_embeddings") or d["max_position_embeddings"])
    return float(theta), {"rope_type": rope_type, **params}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family causal LM (all fields from ``config.json``)."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # bias on q/k/v projections (Qwen2: always)
    o_proj_bias: bool = False         # bias on the output projection (Llama attention_bias)
    qk_norm: bool = False             # per-head RMSNorm on q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    sliding_window: int | None = None  # informational: attention here is always full

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed Hugging Face ``config.json``."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else f"<none; model_type={d.get('model_type')!r}>"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        heads = int(d["num_attention_heads"])
        theta, scaling = _rope_from_hf(d)
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        bias = bool(d.get("attention_bias") or False)
        qkv_bias, o_bias = {"Qwen2ForCausalLM": (True, False),
                            "MistralForCausalLM": (False, False)}.get(arch, (bias, bias))
        window = d.get("sliding_window")
        if arch != "MistralForCausalLM" and not d.get("use_sliding_window"):
            window = None
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        return cls(
            architecture=arch,
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            mlp_bias=bool(d.get("mlp_bias") or False),
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=str(dtype).replace("torch.", ""),
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` in ``path``; EOS ids of ``generation_config.json`` are added."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: a model directory needs a config.json")
        d = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
            if gen_eos is not None:
                base = d.get("eos_token_id")
                base = [] if base is None else (base if isinstance(base, list) else [base])
                extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
                d = {**d, "eos_token_id": base + [e for e in extra if e not in base]}
        return cls.from_hf_dict(d)

    # ------------------------------------------------------- tensor parallelism
    def _tp_ok(self, tp: int) -> bool:
        if tp < 1 or self.num_heads % tp:
            return False
        if tp <= self.num_kv_heads:
            return self.num_kv_heads % tp == 0
        return tp % self.num_kv_heads == 0

    def valid_tp_sizes(self) -> list[int]:
        """Every TP degree this model can be sharded to."""
        return [t for t in range(1, self.num_heads + 1) if self._tp_ok(t)]

    def validate_tp(self, tp_size: int) -> None:
        """Raise ValueError unless the heads split evenly over ``tp_size`` ranks."""
        if not self._tp_ok(tp_size):
            raise ValueError(
                f"tensor-parallel size {tp_size} does not fit {self.num_heads} attention heads "
                f"/ {self.num_kv_heads} KV heads; valid TP degrees: {self.valid_tp_sizes()}")

    def num_heads_per_rank(self, tp: int) -> int:
        """Query heads held by each rank."""
        self.validate_tp(tp)
        return self.num_heads // tp

    def num_kv_heads_per_rank(self, tp: int) -> int:
        """KV heads held by each rank (1 when they are replicated, tp > num_kv_heads)."""
        self.validate_tp(tp)
        return max(1, self.num_kv_heads // tp)

    def kv_head_for_rank(self, rank: int, tp: int) -> tuple[int, ...]:
        """Global KV-head ids that ``rank`` holds, in cache order (see module doc)."""
        self.validate_tp(tp)
        if not 0 <= rank < tp:
            raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
        if tp > self.num_kv_heads:
            return (rank * self.num_kv_heads // tp,)
        n = self.num_kv_heads // tp
        return tuple(range(rank * n, (rank + 1) * n))

    def kv_bytes_per_token(self, dtype: torch.dtype | str, tp: int = 1) -> int:
        """KV-cache bytes one token takes on one rank, all layers, K and V."""
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads_per_rank(tp) * self.head_dim * itemsize

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype as a torch dtype."""
        return _DTYPES[self.torch_dtype]
