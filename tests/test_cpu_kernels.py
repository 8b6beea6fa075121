"""The C++ CPU kernels against their PyTorch references (disagg/kernels/ops.py,
the torch attention backend): every op in float32 and bfloat16, batch
invariance of the linear, decode attention over random block tables, the
engine with kernels on vs off, and the fallback when the build fails."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from conftest import hf_greedy, random_prompts
from disagg.attention.base import AttentionMetadata
from disagg.attention.torch_paged import TorchPagedAttention
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.kernels import cpu, ops
from disagg.sampling_params import SamplingParams

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    module = cpu.load_cpu_ops()
    if module is None:
        pytest.fail(f"the CPU kernels failed to build: {cpu.failure()}")
    return module


@pytest.fixture
def reference():
    """Run a block with the kernels off, then restore whatever was on."""
    def off():
        ops.use_cpu_kernels(False)
    yield off
    ops.use_cpu_kernels(True)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, rtol32=1e-5, atol32=1e-5) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=rtol32, atol=atol32)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (3, 97, 72), (5, 64, 35), (16, 130, 576)])
def test_linear_matches_matmul(ext, dtype, m, n, k):
    torch.manual_seed(m * n + k)
    x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    ref = (x.double() @ w.double().T + b.double())
    out = ext.linear(x, w, b)
    assert out.dtype == dtype and out.shape == (m, n)
    _close(out.double(), ref.to(dtype).double(), dtype, rtol32=1e-4, atol32=1e-4)


def test_linear_rows_do_not_depend_on_the_batch(ext):
    """Any row's result is bit-identical whether it is computed alone or with others."""
    torch.manual_seed(0)
    x, w = torch.randn(11, 576), torch.randn(200, 576)
    together = ext.linear(x, w, None)
    for i in range(11):
        assert torch.equal(ext.linear(x[i:i + 1], w, None)[0], together[i])
    assert torch.equal(ext.linear(x[3:10], w, None), together[3:10])


def test_linear_refuses_bad_shapes(ext):
    with pytest.raises(RuntimeError, match="features"):
        ext.linear(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_ops_match_reference(ext, reference, dtype):
    torch.manual_seed(1)
    x, r, w = torch.randn(7, 64, dtype=dtype), torch.randn(7, 64, dtype=dtype), torch.randn(64, dtype=dtype)
    g = torch.randn(7, 2 * 48, dtype=dtype)
    qkv = torch.randn(7, 4 * 16 + 2 * 2 * 16, dtype=dtype)
    q, k = qkv[:, :64].view(7, 4, 16), qkv[:, 64:96].view(7, 2, 16)     # strided views, like the model
    cos, sin = torch.randn(50, 16), torch.randn(50, 16)
    pos = torch.tensor([0, 3, 49, 7, 7, 12, 1])
    got = dict(norm=ops.rms_norm(x, w, 1e-6), add=ops.add_rms_norm(x, r.clone(), w, 1e-6),
               silu=ops.silu_and_mul(g), rope=ops.rotary(pos, q.clone(), k.clone(), cos, sin))
    reference()
    want = dict(norm=ops.rms_norm(x, w, 1e-6), add=ops.add_rms_norm(x, r.clone(), w, 1e-6),
                silu=ops.silu_and_mul(g), rope=ops.rotary(pos, q.clone(), k.clone(), cos, sin))
    _close(got["norm"], want["norm"], dtype)
    for a, b in zip(got["add"], want["add"]):
        _close(a, b, dtype)
    _close(got["silu"], want["silu"], dtype)
    for a, b in zip(got["rope"], want["rope"]):      # the same roundings as the reference
        assert torch.equal(a, b)


def test_rotary_refuses_positions_outside_the_table(ext):
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError, match="position"):
        ext.rotary(torch.tensor([0, 9]), q, k, torch.randn(9, 8), torch.randn(9, 8))


def _paged_case(dtype, seq_lens, num_heads=6, num_kv_heads=2, head_dim=24, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 5
    cache = torch.randn(num_blocks, 2, num_kv_heads, bs, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()      # scattered, non-monotone blocks
    width = max(-(-n // bs) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        for j in range(-(-n // bs)):
            tables[i, j] = perm.pop()
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(dtype)
    return q, cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_matches_torch_backend(ext, dtype):
    seq_lens = [1, 5, 8, 33, 64, 3]
    q, cache, tables, lens = _paged_case(dtype, seq_lens)
    nseq = len(seq_lens)
    meta = AttentionMetadata(slot_mapping=torch.zeros(nseq, dtype=torch.int64),
                             query_start_loc=torch.arange(nseq + 1, dtype=torch.int32),
                             seq_lens=lens, block_tables=tables, num_decodes=nseq,
                             query_lens_cpu=[1] * nseq, seq_lens_cpu=seq_lens, block_size=4)
    ref = TorchPagedAttention(num_heads=6, num_kv_heads=2, head_dim=24, block_size=4, dtype=dtype,
                              device=torch.device("cpu"))
    ref.plan(meta)
    want = ref.attend_decodes(q, cache, meta, scale=24 ** -0.5)
    got = ext.paged_attention(q, cache, tables, lens, 24 ** -0.5)
    _close(got, want, dtype, rtol32=1e-5, atol32=2e-6)


def test_paged_attention_refuses_blocks_outside_the_cache(ext):
    q, cache, tables, lens = _paged_case(torch.float32, [5])
    tables[0, 1] = cache.shape[0]
    with pytest.raises(RuntimeError, match="block id"):
        ext.paged_attention(q, cache, tables, lens, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_reference(ext, dtype):
    from disagg.attention.base import write_kv
    torch.manual_seed(3)
    cache_a = torch.zeros(6, 2, 2, 4, 8, dtype=dtype)
    cache_b = cache_a.clone()
    kv = torch.randn(5, 2 * 2 * 8, dtype=dtype)
    k, v = kv[:, :16].view(5, 2, 8), kv[:, 16:].view(5, 2, 8)
    slots = torch.tensor([0, 5, 23, 9, 12])
    write_kv(cache_a, k, v, slots)
    ext.write_kv(cache_b, k, v, slots)
    assert torch.equal(cache_a, cache_b)
    with pytest.raises(RuntimeError, match="slot"):
        ext.write_kv(cache_b, k, v, torch.tensor([0, 5, 24, 9, 12]))


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_engine_kernels_and_reference_give_identical_tokens(ext, arch, request):
    """float32 greedy: the kernel path, the PyTorch path and transformers agree."""
    model_dir = request.getfixturevalue(arch)
    prompts = random_prompts(6, 256, 3, 40, seed=21)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for kernels in (True, False):
        cfg = EngineConfig(model=model_dir, num_kv_blocks=256, block_size=4, cpu_kernels=kernels)
        with LLMEngine(cfg) as engine:
            backend = engine.executor.runner.backend.name
            outs[kernels] = [o.output_token_ids for o in engine.generate(prompts, params)]
        assert backend == ("cpu" if kernels else "torch")
    ops.use_cpu_kernels(True)
    assert outs[True] == outs[False] == [hf_greedy(model_dir, p, 12, ignore_eos=True) for p in prompts]


def test_failed_build_falls_back_with_one_warning(tiny_llama, tmp_path, monkeypatch, caplog):
    broken = tmp_path / "cpu_ops.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path / "cache"))
    try:
        with caplog.at_level(logging.WARNING, logger="disagg.kernels.cpu"):
            assert ops.use_cpu_kernels(True) is False
            assert ops.use_cpu_kernels(True) is False          # remembered: no second build
        warnings = [r for r in caplog.records if "CPU kernels unavailable" in r.getMessage()]
        assert len(warnings) == 1 and cpu.failure()
        cfg = EngineConfig(model=tiny_llama, num_kv_blocks=64, block_size=4)
        with LLMEngine(cfg) as engine:
            assert engine.executor.runner.backend.name == "torch"
            out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0))[0]
        assert len(out.output_token_ids) == 4
        with pytest.raises(ValueError, match="C\\+\\+ CPU kernels"):
            LLMEngine(EngineConfig(model=tiny_llama, num_kv_blocks=64, block_size=4,
                                   attention_backend="cpu"))
    finally:
        monkeypatch.undo()
        ops.use_cpu_kernels(True)


def test_kernels_can_be_turned_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setenv("DISAGG_CPU_KERNELS", "0")
    try:
        assert ops.use_cpu_kernels(True) is False and cpu.failure() is None
    finally:
        monkeypatch.undo()
        ops.use_cpu_kernels(True)


def test_auto_dtype_follows_the_cpu(monkeypatch):
    from disagg import cpus
    from disagg.config import resolve_dtype
    monkeypatch.delenv("DISAGG_DTYPE", raising=False)
    assert cpus.has_native_bf16({"avx2", "avx512_bf16"}) and cpus.has_native_bf16({"amx_bf16"})
    assert not cpus.has_native_bf16({"avx2", "avx512f", "fma"})
    monkeypatch.setattr(cpus, "cpu_flags", lambda: {"avx2", "fma"})
    assert EngineConfig().dtype == "float32"
    monkeypatch.setattr(cpus, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert EngineConfig().dtype == "bfloat16"
    assert EngineConfig(dtype="float32").dtype == "float32"        # an explicit dtype stays
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setenv("DISAGG_DTYPE", "float16")
    assert EngineConfig().dtype == "float16"
    monkeypatch.setenv("DISAGG_DTYPE", "int8")
    with pytest.raises(ValueError, match="DISAGG_DTYPE"):
        EngineConfig()
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="fp8")


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(ext):
    """cpp_extension's own lock file outlives a process killed mid-build; ours does not.

    The next start is a new process, as on a real restart (a second load in this
    process would make cpp_extension bump the module's version and build it again).
    """
    path = cpu.build_dir()
    (path / "lock").write_text("")
    code = ("from disagg.kernels import cpu\n"
            "assert cpu.load_cpu_ops() is not None, cpu.failure()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "building CPU kernels" not in done.stderr          # loaded the build, not a new one
    assert not (path / "lock").exists()
