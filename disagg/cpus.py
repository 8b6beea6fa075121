"""Which CPU cores a process may use, pinning to a set of them, what the
cores can compute natively, and what a node reports of its compute at
registration (torch-free, unless a node runs on CUDA).

``--cpus`` flags take Linux's list syntax (``0-3,8``). Pinning sets the
affinity mask, which child processes (TP ranks) inherit; thread counts then
follow :func:`usable_cpus`.
"""

from __future__ import annotations

import os


def usable_cpus() -> list[int]:
    """The cores this process may run on (its affinity mask), ascending."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))     # no affinity API (macOS)


def parse_cpus(text: str) -> set[int]:
    """``"0-3,8"`` → ``{0, 1, 2, 3, 8}``; ``ValueError`` on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--cpus must look like 0-3,8, got {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus range {part.strip()!r} is empty or negative")
        cpus.update(range(first, last + 1))
    return cpus


def format_cpus(cpus) -> str:
    """``{0, 1, 2, 3, 8}`` → ``"0-3,8"`` (the inverse of :func:`parse_cpus`)."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            first = ordered[start]
            parts.append(str(first) if first == cpu else f"{first}-{cpu}")
            start = i + 1
    return ",".join(parts)


def pin_to_cpus(text: str) -> None:
    """Restrict this process (and the TP ranks it starts) to the cores in ``text``."""
    cpus = parse_cpus(text)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs a platform with CPU affinity (Linux)")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ValueError(f"cannot pin to cores {sorted(cpus)}: {exc} "
                         f"(this machine has {os.cpu_count()})") from None


#: /proc/cpuinfo flags of a CPU with native bfloat16 arithmetic (AVX-512 BF16, AMX)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str:
    """``field`` of this machine's first CPU in /proc/cpuinfo ("" where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_model_name() -> str:
    """The CPU's model name ("" where unknown)."""
    return _cpuinfo("model name")


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's first CPU (empty where unknown)."""
    return set(_cpuinfo("flags").split())


def has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def host_memory_limit() -> int:
    """Bytes of memory this process's host offers it: physical RAM, or less where a
    cgroup (a container's memory limit, v2 or v1) caps it."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():                        # "max" (v2) = no limit
            limit = min(limit, int(text))
    return limit


def boot_id() -> str:
    """This kernel's boot id: one per machine and boot, the same in every container
    of the machine ("" where unknown)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def gpu_ids(device: str, tp: int) -> list[str]:
    """The GPUs a node's ranks compute on (empty on CPU): each GPU's UUID, or
    ``cuda:N@BOOT_ID`` where torch does not expose it. Rank r of a TP > 1 node
    uses ``cuda:r`` (as ``ModelRunner`` does); imports torch only for CUDA."""
    if not device.startswith("cuda"):
        return []
    import torch

    if tp > 1:
        indices = list(range(tp))
    else:
        index = device.partition(":")[2]
        indices = [int(index) if index else torch.cuda.current_device()]
    ids = []
    for i in indices:
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        ids.append(f"GPU-{uuid}" if uuid is not None else f"cuda:{i}@{boot_id()}")
    return ids


def compute_report(device: str, tp: int) -> dict:
    """What a node tells the router about its compute (``Register``'s ``boot_id``,
    ``cpus``, ``device`` and ``gpus`` fields), measured in the node process after
    any ``--cpus`` pinning."""
    return {"boot_id": boot_id(), "cpus": usable_cpus(),
            "device": "cuda" if device.startswith("cuda") else "cpu",
            "gpus": gpu_ids(device, tp)}
