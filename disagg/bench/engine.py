"""``disagg bench engine``: engine throughput against transformers ``generate``.

Both systems get the same prompts (random token ids, fixed seed), generate
exactly ``--output-len`` tokens each greedily (EOS ignored), and are timed end
to end (prefill + decode) at each batch size. Each system runs in its own
subprocess, one after the other, so their peak resident memory is measured
separately and they never compete for the cores; the two alternate
``--repeats`` times and each side's best run counts, because a shared machine
drifts. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2,
                   help="alternate the two systems this many times; report each one's best run")
    p.add_argument("--json", action="store_true", help="print compact JSON")
    p.add_argument("--skip-baseline", action="store_true", help="do not run transformers generate")
    p.add_argument("--system", choices=["disagg", "transformers"], help=argparse.SUPPRESS)


def _prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(100, vocab, (batch, prompt_len), generator=g).tolist()


def _peak_rss_mb() -> dict:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"driver": round(self_kb / 1024, 1), "largest_child": round(child_kb / 1024, 1)}


def _bench_disagg(a, sizes: list[int]) -> dict:
    from disagg.cli import engine_config_from_args
    from disagg.engine import LLMEngine
    from disagg.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    overrides = dict(max_num_seqs=max(sizes))
    if a.num_kv_blocks is None:
        # Room for the largest batch at full length (plus slack), so the run
        # measures steady batching rather than preemption under a small budget.
        per_req = -(-(a.prompt_len + a.output_len) // a.block_size)
        overrides["num_kv_blocks"] = max(sizes) * per_req + 64
    cfg = engine_config_from_args(a, **overrides)
    runs = {}
    with LLMEngine(cfg) as engine:
        vocab = engine.model_config.vocab_size
        engine.generate([_prompts(1, 16, vocab)[0]], SamplingParams(max_tokens=4, temperature=0.0))
        for b in sizes:
            prompts = _prompts(b, a.prompt_len, vocab)
            _sync(a.device)
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            _sync(a.device)
            dt = time.perf_counter() - t0
            runs[b] = {"seconds": dt, "tokens_per_s": b * a.output_len / dt,
                       "outputs": [o.output_token_ids for o in outs]}
    return {"runs": runs, "peak_rss_mb": _peak_rss_mb()}


def _bench_transformers(a, sizes: list[int]) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from disagg.model import resolve_model_dir
    model_dir = str(resolve_model_dir(a.model))
    dtype = getattr(torch, a.dtype)
    if a.load_format == "dummy":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(a.device).eval()
    vocab = model.config.vocab_size
    gen_cfg = copy.deepcopy(model.generation_config)
    # Go on past EOS like the engine's ignore_eos. An empty list is what does
    # it: None falls back to the model config's EOS and stops early, and
    # min_new_tokens would forbid EOS instead of generating through it.
    gen_cfg.eos_token_id = []
    runs = {}
    with torch.inference_mode():
        warm = torch.tensor(_prompts(1, 16, vocab), device=a.device)
        model.generate(warm, max_new_tokens=4, do_sample=False)
        for b in sizes:
            ids = torch.tensor(_prompts(b, a.prompt_len, vocab), device=a.device)
            _sync(a.device)
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=a.output_len, generation_config=gen_cfg)
            _sync(a.device)
            dt = time.perf_counter() - t0
            runs[b] = {"seconds": dt, "tokens_per_s": b * a.output_len / dt,
                       "outputs": out[:, a.prompt_len:].tolist()}
    return {"runs": runs, "peak_rss_mb": _peak_rss_mb()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_child(argv: list[str], system: str) -> dict:
    cmd = [sys.executable, "-m", "disagg.cli", *argv, "--system", system, "--json"]
    print(f"[bench] running {system} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{system} benchmark failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """Per batch size, the fastest of several runs; peak memory is the largest."""
    best = {"runs": {}, "peak_rss_mb": {k: max(r["peak_rss_mb"][k] for r in runs)
                                        for k in runs[0]["peak_rss_mb"]}}
    for b in runs[0]["runs"]:
        best["runs"][b] = max((r["runs"][b] for r in runs), key=lambda x: x["tokens_per_s"])
    return best


def run_engine_bench(a: argparse.Namespace) -> dict:
    """Run the benchmark (or, with the hidden --system flag, one side of it)."""
    sizes = [int(s) for s in a.batch_sizes.split(",") if s]
    if a.system == "disagg":
        torch.set_num_threads(os.cpu_count() or 1)
        return _bench_disagg(a, sizes)
    if a.system == "transformers":
        torch.set_num_threads(os.cpu_count() or 1)
        return _bench_transformers(a, sizes)
    argv = [arg for arg in sys.argv[1:] if arg != "--json"]
    ours_runs, base_runs = [], []
    for _ in range(max(1, a.repeats)):      # alternate, so drift hits both sides alike
        ours_runs.append(_run_child(argv, "disagg"))
        if not a.skip_baseline:
            base_runs.append(_run_child(argv, "transformers"))
    ours, base = _best(ours_runs), _best(base_runs) if base_runs else None
    result = {"model": a.model, "device": a.device, "dtype": a.dtype,
              "tensor_parallel_size": a.tensor_parallel_size, "prompt_len": a.prompt_len,
              "output_len": a.output_len, "repeats": max(1, a.repeats),
              "cpu_count": os.cpu_count(), "batches": {},
              "peak_rss_mb": {"disagg": ours["peak_rss_mb"]}}
    if base:
        result["peak_rss_mb"]["transformers"] = base["peak_rss_mb"]
    for b in sizes:
        r = ours["runs"][str(b)]
        row = {"disagg_tokens_per_s": round(r["tokens_per_s"], 2)}
        if base:
            h = base["runs"][str(b)]
            row.update(transformers_tokens_per_s=round(h["tokens_per_s"], 2),
                       ratio=round(r["tokens_per_s"] / h["tokens_per_s"], 3))
            if a.load_format != "dummy":      # random weights differ: nothing to compare
                same = sum(x == y for x, y in zip(r["outputs"], h["outputs"]))
                row["identical_sequences"] = f"{same}/{b}"
        result["batches"][str(b)] = row
    return result
