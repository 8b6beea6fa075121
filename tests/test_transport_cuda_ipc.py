"""CUDA IPC transport: needs a GPU (skipped on CPU machines)."""

from __future__ import annotations

import threading

import pytest
import torch

from transport.base import TransportConfig
from transport.resharding import ReshardPlan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_ipc_round_trip_in_process(tmp_path):
    """Export + open + device copy; same process, so it checks the plumbing, not IPC proper."""
    from transport.cuda_ipc import CudaIpcKVReceiver, CudaIpcKVSender, CudaIpcPool
    src = [torch.randn(8, 2, 2, 4, 8, device="cuda") for _ in range(2)]
    dst = [torch.zeros(8, 2, 2, 4, 8, device="cuda") for _ in range(2)]
    cfg = TransportConfig(kind="cuda_ipc", address=f"ipc://{tmp_path}/rx", timeout_s=5)
    rx = CudaIpcKVReceiver(cfg, dst)
    tx = CudaIpcKVSender(cfg, CudaIpcPool(src), ReshardPlan(2, 1, 1))
    t = threading.Thread(target=rx.poll, args=(5.0,))
    t.start()
    tx.connect(0, rx.endpoint)
    t.join()
    rx.expect("r", [1, 5], [1, 1])
    tid = tx.send("r", 0, [3, 4], [1, 5], [1, 1])
    rx.wait_ready("r", 5)
    tx.wait(tid, 5)
    for s, d in zip(src, dst):
        assert torch.equal(d[[1, 5]], s[[3, 4]])
    tx.close()
    rx.close()
