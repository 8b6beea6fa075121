"""The model package: config parsing, RoPE vs transformers, logits parity with
transformers on tiny random models (TP 1 and TP 2), loading and the embedded model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import needs_smollm2
from disagg.attention.base import AttentionMetadata
from disagg.attention.layer import ForwardContext, forward_context
from disagg.attention.torch_paged import TorchPagedAttention
from disagg.model import ModelConfig, RotaryEmbedding, load_model, resolve_model_dir
from disagg.model.embedded import build_once
from disagg.model.rope import rope_inv_freq

BS = 4   # KV block size used by these tests
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True, num_hidden_layers=3)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16})),
    "yarn-rope": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 16})),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-mqa": ("qwen2", dict(num_key_value_heads=1)),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32, num_hidden_layers=4)),
}


def make_hf_model(path: Path, variant: str):
    """Save a tiny HF model with every parameter randomised (biases and norms too)."""
    import transformers as tf
    family, extra = VARIANTS[variant]
    cls_cfg, cls_model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    model = cls_model(cls_cfg(rope_theta=5000.0, **{**TINY, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def step(model, caches, seqs, num_decodes: int = 0):
    """Run one flattened step; seqs = [(new_ids, start_pos, block_ids)], decodes first."""
    ids, pos, slots, qsl, lens, qlens = [], [], [], [0], [], []
    for new, start, blocks in seqs:
        for i, tok in enumerate(new):
            p = start + i
            ids.append(tok), pos.append(p), slots.append(blocks[p // BS] * BS + p % BS)
        qsl.append(qsl[-1] + len(new)), lens.append(start + len(new)), qlens.append(len(new))
    width = max(len(b) for _, _, b in seqs)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([b + [0] * (width - len(b)) for _, _, b in seqs], dtype=torch.int32),
        num_decodes=num_decodes,
        query_lens_cpu=qlens, seq_lens_cpu=lens, block_size=BS)
    backend = TorchPagedAttention(model.num_heads, model.num_kv_heads, model.head_dim, BS,
                                  caches[0].dtype, torch.device("cpu"))
    with torch.no_grad(), forward_context(ForwardContext(meta, caches, backend)):
        return model.compute_logits(model(torch.tensor(ids), torch.tensor(pos)))


def new_caches(model, num_blocks=16, dtype=torch.float32):
    return [torch.zeros(num_blocks, 2, model.num_kv_heads, BS, model.head_dim, dtype=dtype)
            for _ in range(model.num_layers)]


def prefill_logits(model_dir, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    model = load_model(ModelConfig.from_dir(model_dir), model_dir, dtype, "cpu")
    return step(model, new_caches(model, dtype=dtype), [(ids, 0, list(range(8)))])


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


PROMPT = [1, 17, 200, 45, 3, 99, 128, 7, 250, 31, 64, 5, 77]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_transformers(tmp_path, variant):
    hf = make_hf_model(tmp_path, variant)
    ours, ref = prefill_logits(tmp_path, PROMPT), hf_logits(hf, PROMPT)
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("variant", ["llama-bias", "qwen2-bias", "qwen3-qknorm"])
def test_bf16_logits_match_transformers(tmp_path, variant):
    """bf16 rounds after every op, so any op-order difference from HF shows here."""
    from transformers import AutoModelForCausalLM
    make_hf_model(tmp_path, variant)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, ref = prefill_logits(tmp_path, PROMPT, torch.bfloat16), hf_logits(hf, PROMPT)
    assert (ours - ref).abs().max().item() < 1e-2
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("variant", ["llama-tied", "qwen3-qknorm"])
def test_chunked_prefill_and_decode_match_transformers(tmp_path, variant):
    hf = make_hf_model(tmp_path, variant)
    model = load_model(ModelConfig.from_dir(tmp_path), tmp_path, torch.float32, "cpu")
    a, b = PROMPT[:10], [1, 4, 8, 15, 16, 23]
    blocks_a, blocks_b = [3, 0, 5], [1, 2]
    caches = new_caches(model)
    out1 = step(model, caches, [(a[:6], 0, blocks_a)])                     # first chunk
    out2 = step(model, caches, [(a[6:9], 6, blocks_a)])                    # chunk over a cached prefix
    out3 = step(model, caches, [(a[9:], 9, blocks_a), (b, 0, blocks_b)], num_decodes=1)
    ours_a = torch.cat([out1, out2, out3[:1]])
    for ours, ref in ((ours_a, hf_logits(hf, a)), (out3[1:], hf_logits(hf, b))):
        assert (ours - ref).abs().max().item() < 1e-4
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def _tp_worker(rank: int, world: int, init_file: str, dirs: list[str], out_dir: str) -> None:
    from disagg.distributed import destroy_tensor_parallel, init_tensor_parallel
    torch.set_num_threads(1)
    init_tensor_parallel(rank, world, f"file://{init_file}", "cpu")
    try:
        for i, d in enumerate(dirs):
            logits = prefill_logits(d, PROMPT)
            if rank == 0:
                torch.save(logits, f"{out_dir}/logits{i}.pt")
    finally:
        destroy_tensor_parallel()


def test_tp2_logits_match_tp1(tmp_path):
    variants = ["llama-bias", "qwen2-mqa", "qwen3-qknorm"]   # qwen2-mqa replicates its KV head
    dirs = []
    for v in variants:
        make_hf_model(tmp_path / v, v)
        dirs.append(str(tmp_path / v))
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), dirs, str(tmp_path)), nprocs=2)
    for i, d in enumerate(dirs):
        tp2, tp1 = torch.load(tmp_path / f"logits{i}.pt"), prefill_logits(d, PROMPT)
        assert (tp2 - tp1).abs().max().item() < 1e-4, variants[i]
        assert torch.equal(tp2.argmax(-1), tp1.argmax(-1))


# ----------------------------------------------------------------- config
def _hf_dict(**kw):
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "vocab_size": 256, "max_position_embeddings": 64, **kw}


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict(_hf_dict(architectures=["GPT2LMHeadModel"]))


def test_tp_validation_and_kv_head_ownership():
    cfg = ModelConfig.from_hf_dict(_hf_dict(num_attention_heads=8, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"valid TP degrees: \[1, 2, 4, 8\]"):
        cfg.validate_tp(3)
    assert [cfg.kv_head_for_rank(r, 4) for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert [cfg.kv_head_for_rank(r, 2) for r in range(2)] == [(0,), (1,)]
    assert cfg.kv_head_for_rank(0, 1) == (0, 1)
    assert cfg.num_kv_heads_per_rank(8) == 1 and cfg.num_heads_per_rank(8) == 1
    assert cfg.kv_bytes_per_token(torch.float32, 2) == 2 * 2 * 1 * 8 * 4
    smol = ModelConfig.from_hf_dict(_hf_dict(num_attention_heads=9, num_key_value_heads=3,
                                             hidden_size=576, num_hidden_layers=30))
    assert smol.valid_tp_sizes() == [1, 3, 9]
    with pytest.raises(ValueError, match="valid TP degrees"):
        smol.validate_tp(2)


def test_config_rope_layouts_eos_and_head_dim():
    new = ModelConfig.from_hf_dict(_hf_dict(rope_parameters={"rope_theta": 5e5, "rope_type": "linear",
                                                             "factor": 2.0}, eos_token_id=[2, 7]))
    old = ModelConfig.from_hf_dict(_hf_dict(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0},
                                            eos_token_id=[2, 7]))
    assert new == old and new.rope_theta == 5e5 and new.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert new.eos_token_ids == (2, 7)
    q3 = ModelConfig.from_hf_dict(_hf_dict(architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert q3.head_dim == 32 and q3.qk_norm and not q3.attention_bias
    q2 = ModelConfig.from_hf_dict(_hf_dict(architectures=["Qwen2ForCausalLM"]))
    assert q2.head_dim == 16 and q2.attention_bias and not q2.o_proj_bias


# ------------------------------------------------------------------- rope
ROPE_CASES = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_inv_freq_matches_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kind = case.split("-")[0]
    params = {"rope_type": kind, "rope_theta": 10000.0, **ROPE_CASES[case]}
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters=dict(params))
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    cfg = ModelConfig.from_hf_dict(_hf_dict(hidden_size=256, max_position_embeddings=256,
                                            rope_parameters=dict(params)))
    inv, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, 256)
    assert torch.equal(inv, ref_inv) and factor == pytest.approx(ref_factor, rel=1e-12)
    rope = RotaryEmbedding(64, 1024, 10000.0, cfg.rope_scaling, 256)
    for p in (0, 5, 255, 256, 700):                     # dynamic grows its base past 256
        if kind == "dynamic" and p >= 256:
            ref_inv, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", seq_len=torch.tensor(p + 1))
        ang = torch.tensor(float(p)) * ref_inv
        assert torch.allclose(rope.cos_cache[p], torch.cat([ang, ang]).cos() * ref_factor, atol=1e-6)


def test_rope_apply_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=128,
                         rope_parameters={"rope_theta": 10000.0, **scaling})
    pos = torch.tensor([0, 3, 31, 32, 100])
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(q, pos[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours_q, ours_k = RotaryEmbedding(32, 128, 10000.0, scaling, 128)(pos, q, k)
    assert torch.equal(ours_q, ref_q[0].transpose(0, 1)) and torch.equal(ours_k, ref_k[0].transpose(0, 1))


def test_unknown_rope_type_raises():
    with pytest.raises(ValueError, match="unknown rope_type 'wobbly'.*llama3"):
        RotaryEmbedding(16, 8, 10000.0, {"rope_type": "wobbly"}, 8)


# ---------------------------------------------------------------- loading
def test_missing_weight_and_bad_dirs(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_model(tmp_path, "llama-bias")
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"qkv_proj.bias\[k\]"):
        load_model(ModelConfig.from_dir(tmp_path), tmp_path, torch.float32, "cpu")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_dir(str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_dir("./no/such/model")


def test_hub_id_fails_clearly_offline(monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline or the hub is unreachable.*'default'"):
        resolve_model_dir("no-such-org/no-such-model-xyz")


def test_dummy_weights_are_deterministic(tmp_path):
    make_hf_model(tmp_path, "qwen3-qknorm")
    cfg = ModelConfig.from_dir(tmp_path)
    a, b = (load_model(cfg, None, torch.float32, "cpu", load_format="dummy") for _ in range(2))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert step(a, new_caches(a), [(PROMPT, 0, list(range(8)))]).isfinite().all()


def _build_slowly(out: Path, log: str) -> None:
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(0.5)
    (out / "payload.json").write_text(json.dumps({"ok": True}))


def _build_worker(rank: int, target: str, log: str) -> None:
    build_once(Path(target), lambda out: _build_slowly(out, log))


def test_build_once_runs_once_under_concurrency(tmp_path):
    target, log = tmp_path / "cache" / "model", tmp_path / "log.txt"
    mp.spawn(_build_worker, args=(str(target), str(log)), nprocs=2)
    assert log.read_text() == "built\n"
    assert json.loads((target / "payload.json").read_text()) == {"ok": True}
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


@needs_smollm2
def test_embedded_smollm2_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig.from_dir(smollm2_dir)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.tie_word_embeddings and cfg.architecture == "LlamaForCausalLM"
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours, ref = prefill_logits(smollm2_dir, ids), hf_logits(hf, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
