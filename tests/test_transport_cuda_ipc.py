"""CUDA IPC transport: needs a GPU (skipped on CPU machines)."""

from __future__ import annotations

import pytest
import torch

from transport.base import TransportConfig
from transport.resharding import ReshardPlan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_sender(endpoint: str, seed: int) -> int:
    """Child process: export a seeded CUDA pool over IPC and send blocks [3, 4]."""
    from transport.cuda_ipc import CudaIpcKVSender, CudaIpcPool
    g = torch.Generator().manual_seed(seed)
    src = [torch.randn(8, 2, 2, 4, 8, generator=g).cuda() for _ in range(2)]
    cfg = TransportConfig(kind="cuda_ipc", address="tcp://127.0.0.1:*", timeout_s=20)
    tx = CudaIpcKVSender(cfg, CudaIpcPool(src), ReshardPlan(2, 1, 1))
    tx.connect(0, endpoint)
    tid = tx.send("r", 0, [3, 4], [1, 5], [1, 1])
    tx.wait(tid, 20)
    torch.cuda.synchronize()
    tx.close()
    return 0


def test_cuda_ipc_between_processes():
    """A second process exports its pool; this one opens the handle and copies on device."""
    import multiprocessing as mp
    import time

    from transport.cuda_ipc import CudaIpcKVReceiver
    dst = [torch.zeros(8, 2, 2, 4, 8, device="cuda") for _ in range(2)]
    rx = CudaIpcKVReceiver(TransportConfig(kind="cuda_ipc", address="tcp://127.0.0.1:*",
                                           timeout_s=20), dst)
    rx.expect("r", [1, 5], [1, 1])
    with mp.get_context("spawn").Pool(1) as pool:
        res = pool.apply_async(_cuda_sender, (rx.endpoint, 7))
        deadline = time.monotonic() + 120
        while not res.ready():
            assert time.monotonic() < deadline, "sender process did not finish"
            rx.poll(0.01)
        assert res.get() == 0
    assert rx.pop_ready() == {"r"}
    g = torch.Generator().manual_seed(7)
    src = [torch.randn(8, 2, 2, 4, 8, generator=g) for _ in range(2)]
    for s, d in zip(src, dst):
        assert torch.equal(d[[1, 5]].cpu(), s[[3, 4]])
        assert not d[[0, 2, 3, 4, 6, 7]].any()
    rx.close()
