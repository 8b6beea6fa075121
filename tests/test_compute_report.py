"""What a node reports of its compute at registration (``disagg.cpus.compute_report``,
``Register``'s compute fields) and how the router reads it."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack

from disagg.control import messages as m
from disagg.cpus import boot_id, compute_report, format_cpus, gpu_ids, parse_cpus, usable_cpus
from router.nodes import NodeRegistry

OLD_REGISTER = dict(type="Register", node_id="p0", role="prefill", tp=1, block_size=16,
                    model="m", max_model_len=4096, vocab_size=1000, num_kv_blocks=100,
                    kv_bytes_per_token=64, kv_transport="zmq", kv_endpoints=[], pid=1, host="h")


def test_format_cpus_inverts_parse_cpus():
    for text in ("0", "0-3,8", "1,3,5-7", "0-15"):
        assert format_cpus(parse_cpus(text)) == text
    assert format_cpus([3, 1, 2, 2]) == "1-3" and format_cpus([]) == ""


def test_report_on_cpu():
    report = compute_report("cpu", 1)
    assert report == {"boot_id": boot_id(), "cpus": usable_cpus(), "device": "cpu", "gpus": []}
    assert len(boot_id()) == 36                  # a UUID on Linux
    assert gpu_ids("cpu", 4) == []


def test_report_follows_pinning():
    code = ("from disagg.cpus import pin_to_cpus, compute_report; import json; "
            "pin_to_cpus('0'); print(json.dumps(compute_report('cpu', 1)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpus"] == [0]


def test_register_carries_compute_and_older_nodes_still_register():
    new = m.Register(**{k: v for k, v in OLD_REGISTER.items() if k not in ("type", "node_id")},
                     node_id="p1",
                     **compute_report("cpu", 1))
    assert m.decode(m.encode(new)) == new
    old = m.decode(msgpack.packb(OLD_REGISTER))  # a node from before the compute fields
    assert (old.boot_id, old.cpus, old.device, old.gpus) == ("", [], "", [])
    r = NodeRegistry("m")
    assert r.register(old).compute.share_on(r.register(new).compute) == 0.0


def test_a_node_registers_its_compute(tiny_llama):
    """A real ``NodeServer`` sends a ``Register`` with this process's boot id, cores
    and device."""
    import zmq

    from disagg.config import EngineConfig
    from disagg.engine import LLMEngine
    from disagg.node.server import NodeServer
    from prefill_node.handler import PrefillHandler

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    engine = LLMEngine(EngineConfig(model=tiny_llama, role="prefill", block_size=4, num_kv_blocks=16))
    server = NodeServer(engine, PrefillHandler, f"tcp://127.0.0.1:{port}", "prefill-0", "m")
    try:
        server._sync_links()                      # opens the link and sends Register
        assert router.poll(10_000)
        _, frame = router.recv_multipart()
        reg = m.decode(frame)
        assert isinstance(reg, m.Register) and reg.node_id == "prefill-0"
        assert (reg.boot_id, reg.cpus, reg.device, reg.gpus) == (boot_id(), usable_cpus(), "cpu", [])
    finally:
        server.close()
        router.close(0)
        ctx.term()
