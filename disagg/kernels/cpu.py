"""Build and load the C++ CPU kernels (``cpu_ops.cpp``) on first use.

The extension is compiled once per machine with the host's instruction set
(``-march=native``) by ``torch.utils.cpp_extension`` and cached under
``$DISAGG_CACHE_DIR/kernels`` (default ``~/.cache/disagg/kernels``), keyed by
the source (its path and text), the flags, the CPU model and the torch and
Python versions, so a restart loads it in well under a second. Several
processes starting at once (TP ranks, a prefill and a decode node) share one
build: ``cpp_extension`` holds a lock file in the build directory while one of
them compiles.

If the build fails (no compiler, no ninja, an unsupported CPU), the engine
keeps serving on the PyTorch reference path and says so once. Set
``DISAGG_CPU_KERNELS=0`` to skip the kernels entirely.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17"]

_loaded: ModuleType | None = None
_failure: str | None = None


def kernels_disabled() -> bool:
    """Whether ``DISAGG_CPU_KERNELS`` turns the kernels off (0, false, off, no)."""
    return os.environ.get("DISAGG_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no")


def build_dir() -> Path:
    """Where this machine's build of the kernels lives (created if missing)."""
    import torch
    from disagg.cpus import cpu_flags, cpu_model_name
    from disagg.model.embedded import cache_root
    host = f"{cpu_model_name()} {' '.join(sorted(cpu_flags()))}".strip() or platform.machine()
    # the source's path too: cpp_extension rebuilds when a build directory's recorded
    # source path changes, so two checkouts sharing one would rebuild at every switch
    key = hashlib.sha256("\n".join([str(SOURCE), SOURCE.read_text(), " ".join(CFLAGS), host,
                                    torch.__version__, sys.version]).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip-installed one lives in the venv."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One process at a time builds or loads; the lock dies with its holder.

    ``cpp_extension`` has a lock of its own, a plain file that a process
    killed mid-build (Ctrl-C on a first start) leaves behind, after which every
    later start would wait for it forever. Under this ``flock`` no other
    process is inside ``cpp_extension``, so such a file is stale and removed.
    """
    with open(path / "disagg-build.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("[disagg] waiting for another process building the CPU kernels ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        (path / "lock").unlink(missing_ok=True)
        yield


def _build_and_load(path: Path) -> ModuleType:
    from torch.utils import cpp_extension
    fresh = not any(path.glob("*.so"))
    if fresh:
        print(f"[disagg] building CPU kernels into {path} (once per machine, ~1 min) ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    module = cpp_extension.load(name="disagg_cpu_ops", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                                extra_ldflags=["-fopenmp"], build_directory=str(path), verbose=False)
    if fresh:
        print(f"[disagg] CPU kernels built in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return module


def load_cpu_ops() -> ModuleType | None:
    """The compiled kernels, building them if needed; ``None`` if unavailable.

    Never raises: a failed build is logged once as a warning and remembered,
    and the caller uses the PyTorch reference path.
    """
    global _loaded, _failure
    if _loaded is not None or _failure is not None or kernels_disabled():
        return _loaded
    try:
        _ninja_on_path()
        path = build_dir()
        with _build_lock(path):
            _loaded = _build_and_load(path)
    except Exception as exc:     # noqa: BLE001 - any build failure means: serve without them
        _failure = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        log.warning("CPU kernels unavailable (%s); using the PyTorch reference path", _failure)
    return _loaded


def failure() -> str | None:
    """Why the last :func:`load_cpu_ops` returned ``None`` (``None`` if it did not fail)."""
    return _failure
