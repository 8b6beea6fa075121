"""FlashInfer paged attention against the PyTorch reference, on identical caches.

The GPU tests skip unless flashinfer is installed and CUDA is available. Each
builds a random cache with shuffled, non-contiguous block ids, runs one step
through :class:`FlashInferAttention` (in bf16 or fp16) and through
:class:`TorchPagedAttention` (in fp32 on the upcast inputs) and compares.
The first use of each dtype JIT-compiles FlashInfer's kernels (minutes).
"""

from __future__ import annotations

import importlib.util
import math
import threading

import pytest
import torch

from disagg.attention.base import AttentionMetadata
from disagg.attention.flashinfer_backend import FlashInferAttention, build_page_plan
from disagg.attention.torch_paged import TorchPagedAttention

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("flashinfer") is not None
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and flashinfer (pip install flashinfer-python)")

HEAD_DIM = 64
NUM_KV_HEADS = 2
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

# (query_len, seq_len) per sequence; decodes (query_len 1) first.
MIXED = [(1, 1), (1, 17), (1, 40), (1, 33),        # decodes: 4
         (5, 37), (20, 20), (1, 9), (16, 48), (3, 3)]  # chunked, fresh, 1-token, page-aligned
MIXED_DECODES = 4
DECODE_ONLY = [(1, 5), (1, 16), (1, 31), (1, 64), (1, 100), (1, 2)]
CHUNKED = [(7, 50), (1, 30), (13, 13), (32, 80)]   # query shorter than key


def make_step(specs: list[tuple[int, int]], num_decodes: int, block_size: int,
              dtype: torch.dtype, device: str, extra_blocks: int = 5):
    """A step's metadata plus a random cache whose block ids are shuffled."""
    n_pages = [math.ceil(s / block_size) for _, s in specs]
    num_blocks = sum(n_pages) + extra_blocks
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.zeros(len(specs), max(n_pages) + 2, dtype=torch.int32)
    slots, start = [], 0
    for i, ((q_len, seq_len), n) in enumerate(zip(specs, n_pages)):
        block_tables[i, :n] = torch.tensor(perm[start:start + n], dtype=torch.int32)
        start += n
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    q_lens = [q for q, _ in specs]
    seq_lens = [s for _, s in specs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()),
                                     dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables, num_decodes=num_decodes, query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens, block_size=block_size).to(device)
    cache = torch.randn(num_blocks, 2, NUM_KV_HEADS, block_size, HEAD_DIM, device=device)
    return meta, cache.to(dtype)


def run_both(specs, num_decodes, block_size, group, dtype, *, backend="fa2", scale=None,
             layers=1, strided_q=False):
    """Run FlashInfer and the fp32 reference on the same inputs; return both outputs."""
    dev = "cuda"
    heads = NUM_KV_HEADS * group
    scale = HEAD_DIM ** -0.5 if scale is None else scale
    meta, _ = make_step(specs, num_decodes, block_size, dtype, dev)
    fi = FlashInferAttention(heads, NUM_KV_HEADS, HEAD_DIM, block_size, dtype,
                             torch.device(dev), backend=backend)
    ref = TorchPagedAttention(heads, NUM_KV_HEADS, HEAD_DIM, block_size, torch.float32,
                              torch.device(dev))
    fi.plan(meta)
    ref.plan(meta)
    t = meta.num_tokens
    outs, refs = [], []
    for _ in range(layers):                       # one plan serves every layer
        _, cache = make_step(specs, num_decodes, block_size, dtype, dev)
        ref_cache = cache.float()
        qkv = torch.randn(t, heads + 2 * NUM_KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        q, k, v = qkv.split([heads, NUM_KV_HEADS, NUM_KV_HEADS], dim=1)   # (T, H, D) views
        if not strided_q:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = fi.forward(q, k, v, cache, meta, scale)
        expect = ref.forward(q.float(), k.float(), v.float(), ref_cache, meta, scale)
        torch.cuda.synchronize()
        assert torch.equal(cache.float(), ref_cache), "K/V writes differ"
        outs.append(out)
        refs.append(expect)
    return outs, refs


def check(outs, refs, dtype):
    """Every output close to its reference, with no NaN and small relative error."""
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == dtype
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < TOL[dtype], f"relative error {rel:.2e}"
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def warm_up_jit(dtypes=(torch.bfloat16, torch.float16)) -> None:
    """Compile FlashInfer's decode and prefill kernels for ``dtypes`` in parallel."""
    jobs = [(d, specs, nd) for d in dtypes
            for specs, nd in ((DECODE_ONLY[:2], 2), (CHUNKED[:1], 0))]
    errors: list[BaseException] = []

    def build(dtype, specs, nd):
        try:
            meta, _ = make_step(specs, nd, 16, dtype, "cuda")
            FlashInferAttention(NUM_KV_HEADS, NUM_KV_HEADS, HEAD_DIM, 16, dtype,
                                torch.device("cuda")).plan(meta)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=build, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def jit():
    """Skip without flashinfer/CUDA; otherwise compile the kernels once, in parallel."""
    pytest.importorskip("flashinfer")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    warm_up_jit()


def test_page_plan_csr_layout():
    """Page ids come row by row, only the used blocks; last pages may be partial."""
    meta, _ = make_step([(1, 5), (3, 16), (2, 17)], 1, 4, torch.float32, "cpu")
    plan = build_page_plan(meta, 0, 3)
    assert plan.indptr.tolist() == [0, 2, 6, 11]
    assert plan.last_page_len.tolist() == [1, 4, 1]
    assert plan.qo_indptr.tolist() == [0, 1, 4, 6]
    bt = meta.block_tables
    expect = bt[0, :2].tolist() + bt[1, :4].tolist() + bt[2, :5].tolist()
    assert plan.indices.tolist() == expect and plan.indices.dtype == torch.int32
    tail = build_page_plan(meta, 1, 3)
    assert tail.indptr.tolist() == [0, 4, 9] and tail.indices.tolist() == expect[2:]


def test_page_plan_rejects_bad_lengths():
    """A query longer than its context is an error, not a silent wrong answer."""
    meta, _ = make_step([(2, 5)], 0, 4, torch.float32, "cpu")
    meta.query_lens_cpu[0] = 6
    with pytest.raises(ValueError, match="query_len"):
        build_page_plan(meta, 0, 1)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_mixed_batch(jit, dtype, block_size, group):
    """Decodes and prefill chunks (over cached prefixes, fresh, 1-token) in one step."""
    check(*run_both(MIXED, MIXED_DECODES, block_size, group, dtype), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_pure_decode(jit, dtype, block_size, group):
    """A decode-only batch: only the decode wrapper runs."""
    check(*run_both(DECODE_ONLY, len(DECODE_ONLY), block_size, group, dtype), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
def test_chunked_prefill_bottom_right_causal(jit, dtype, group):
    """Query chunks shorter than their context: the causal mask is bottom-right aligned."""
    check(*run_both(CHUNKED, 0, 16, group, dtype), dtype)


@gpu
def test_plan_serves_many_layers_and_replans_scale(jit):
    """One plan, several layers; a different softmax scale triggers a re-plan."""
    check(*run_both(MIXED, MIXED_DECODES, 16, 3, torch.bfloat16, layers=3), torch.bfloat16)
    check(*run_both(MIXED, MIXED_DECODES, 16, 3, torch.bfloat16, scale=0.3), torch.bfloat16)


@gpu
def test_forward_without_plan_is_an_error(jit):
    """forward() on metadata that was never planned raises instead of misreading."""
    meta, cache = make_step(DECODE_ONLY, len(DECODE_ONLY), 16, torch.bfloat16, "cuda")
    fi = FlashInferAttention(2, 2, HEAD_DIM, 16, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(meta.num_tokens, 2, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="plan"):
        fi.forward(q, q, q, cache, meta, HEAD_DIM ** -0.5)


@gpu
def test_strided_qkv_views(jit):
    """q/k/v as views into one fused qkv tensor (what a model's split produces)."""
    check(*run_both(MIXED, MIXED_DECODES, 16, 3, torch.bfloat16, strided_q=True),
          torch.bfloat16)


@gpu
@pytest.mark.skipif(HAS_GPU and torch.cuda.get_device_capability()[0] != 9,
                    reason="FlashInfer's fa3 kernels need a Hopper GPU")
def test_fa3_prefill_on_hopper(jit):
    """The Hopper (fa3) kernel family gives the same answers (compiles on first use)."""
    check(*run_both(MIXED, MIXED_DECODES, 16, 3, torch.bfloat16, backend="fa3"),
          torch.bfloat16)
