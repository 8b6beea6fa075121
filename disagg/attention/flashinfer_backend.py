"""FlashInfer paged attention for CUDA devices.

One step's flattened batch (decodes first, then prefill chunks; see
:mod:`disagg.attention.base`) is split in two and each part goes to its own
FlashInfer wrapper::

    tokens:  | d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 |
             '-- decode ---'------- prefill -------'
              BatchDecode...  BatchPrefillWithPagedKVCache (causal)

Both read the cache in FlashInfer's ``HND`` layout, which is this project's
per-layer layout ``(num_blocks, 2, H_kv, block_size, D)``. Their page tables are
CSR arrays built once per step in :meth:`FlashInferAttention.plan`::

    seq i uses pages block_tables[i, :ceil(seq_len / block_size)]
    paged_kv_indices  = those page ids, sequence after sequence
    paged_kv_indptr   = [0, n_0, n_0 + n_1, ...]
    last_page_len[i]  = seq_len - (n_i - 1) * block_size      (1 .. block_size)

FlashInfer's causal mask for a query chunk shorter than its context is aligned
to the bottom right, as the metadata requires. Both wrappers share one float
workspace; they run one after the other on the same stream, so that is safe.
``flashinfer`` is imported lazily: this module can be imported without it.
"""

from __future__ import annotations

import torch

from disagg.attention.base import AttentionBackend, AttentionMetadata, write_kv

WORKSPACE_BYTES = 128 * 1024 * 1024
FLASHINFER_BACKENDS = ("auto", "fa2", "fa3")
# Decode with FlashInfer's tensor-core (prefill) kernel from this GQA group size on.
TENSOR_CORE_GROUP_SIZE = 4


def _import_flashinfer():
    """Import flashinfer or explain how to install it."""
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError(
            "the flashinfer attention backend needs FlashInfer: "
            "pip install flashinfer-python (or this project's `gpu` extra)") from exc
    return flashinfer


class _PagePlan:
    """CSR page tables of one group of sequences (host indptr, device indices)."""

    def __init__(self, indptr: list[int], last_page_len: list[int], qo_indptr: list[int],
                 indices: torch.Tensor) -> None:
        self.num_seqs = len(last_page_len)
        self.indptr = torch.tensor(indptr, dtype=torch.int32)                # (S+1,)
        self.last_page_len = torch.tensor(last_page_len, dtype=torch.int32)  # (S,)
        self.qo_indptr = torch.tensor(qo_indptr, dtype=torch.int32)          # (S+1,)
        self.indices = indices                                               # (indptr[-1],) int32


def build_page_plan(meta: AttentionMetadata, first: int, last: int) -> _PagePlan:
    """Page tables for sequences ``first .. last-1`` of ``meta`` (see module doc)."""
    bs = meta.block_size
    max_blocks = int(meta.block_tables.shape[1])
    indptr, last_len, qo_indptr, flat = [0], [], [0], []
    for i in range(first, last):
        seq_len, q_len = meta.seq_lens_cpu[i], meta.query_lens_cpu[i]
        if seq_len < 1 or q_len < 1 or q_len > seq_len:
            raise ValueError(f"sequence {i}: need 1 <= query_len ({q_len}) <= "
                             f"seq_len ({seq_len})")
        n_pages = -(-seq_len // bs)
        if n_pages > max_blocks:
            raise ValueError(f"sequence {i}: seq_len {seq_len} needs {n_pages} blocks of "
                             f"{bs} but block_tables has only {max_blocks} columns")
        flat.extend(range(i * max_blocks, i * max_blocks + n_pages))
        indptr.append(indptr[-1] + n_pages)
        last_len.append(seq_len - (n_pages - 1) * bs)
        qo_indptr.append(qo_indptr[-1] + q_len)
    # Gather the used block ids on the block table's device (no host sync).
    pos = torch.tensor(flat, dtype=torch.int64).to(meta.block_tables.device, non_blocking=True)
    indices = meta.block_tables.reshape(-1)[pos].to(torch.int32)
    return _PagePlan(indptr, last_len, qo_indptr, indices)


class FlashInferAttention(AttentionBackend):
    """Paged attention through FlashInfer's batch decode and batch prefill wrappers.

    ``backend`` picks FlashInfer's kernel family for both wrappers: "fa2" (the
    default; Ampere and newer), "fa3" (Hopper) or "auto" (FlashInfer decides).
    ``scale`` is the softmax scale planned in :meth:`plan`; a layer that asks
    for another scale in :meth:`forward` triggers a re-plan.
    """

    name = "flashinfer"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, *, backend: str = "fa2",
                 scale: float | None = None, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size, dtype, device)
        if backend not in FLASHINFER_BACKENDS:
            raise ValueError(f"unknown FlashInfer backend {backend!r}; "
                             f"choose from {FLASHINFER_BACKENDS}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if torch.device(device).type != "cuda":
            raise ValueError(f"FlashInfer runs on CUDA devices only, got {device}")
        flashinfer = _import_flashinfer()
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=device)
        self.use_tensor_cores = num_heads // num_kv_heads >= TENSOR_CORE_GROUP_SIZE
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, kv_layout="HND", use_tensor_cores=self.use_tensor_cores,
            backend=backend)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, kv_layout="HND", backend=backend)
        self._meta: AttentionMetadata | None = None
        self._planned_scale: float | None = None
        self._decode_plan: _PagePlan | None = None
        self._prefill_plan: _PagePlan | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        """Build this step's page tables and plan both wrappers (skip an empty part)."""
        if meta.block_size != self.block_size:
            raise ValueError(f"metadata block_size {meta.block_size} != backend "
                             f"block_size {self.block_size}")
        nd, ns = meta.num_decodes, meta.num_seqs
        if any(q != 1 for q in meta.query_lens_cpu[:nd]):
            raise ValueError("the first num_decodes sequences must have query_len 1")
        self._meta = meta
        self._decode_plan = build_page_plan(meta, 0, nd) if nd else None
        self._prefill_plan = build_page_plan(meta, nd, ns) if ns > nd else None
        self._plan_wrappers(self.scale)

    def _plan_wrappers(self, scale: float) -> None:
        """Hand the page tables to FlashInfer with softmax scale ``scale``."""
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      page_size=self.block_size, q_data_type=self.dtype,
                      kv_data_type=self.dtype, sm_scale=scale)
        d = self._decode_plan
        if d is not None:
            self._decode.plan(d.indptr, d.indices, d.last_page_len,
                              head_dim=self.head_dim, **common)
        p = self._prefill_plan
        if p is not None:
            self._prefill.plan(p.qo_indptr, p.indptr, p.indices, p.last_page_len,
                               head_dim_qk=self.head_dim, causal=True, **common)
        self._planned_scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write K/V at ``meta.slot_mapping``, then attend (q: (T, H, D) -> (T, H, D))."""
        planned = self._meta   # meta.to(device) keeps the host lists: compare those
        if (planned is None or meta.seq_lens_cpu is not planned.seq_lens_cpu
                or meta.query_lens_cpu is not planned.query_lens_cpu):
            raise RuntimeError("FlashInferAttention.forward called with metadata that was "
                               "not planned; call plan(meta) once per step first")
        if scale != self._planned_scale:
            self._plan_wrappers(scale)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)                                   # (T, H, D)
        nd = meta.num_decodes
        if self._decode_plan is not None:
            self._decode.run(q[:nd], kv_cache, out=out[:nd])        # (nd, H, D)
        if self._prefill_plan is not None:
            self._prefill.run(q[nd:], kv_cache, out=out[nd:])       # (T - nd, H, D)
        return out
