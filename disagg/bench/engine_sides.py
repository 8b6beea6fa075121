"""What one side of ``disagg bench engine`` runs inside its own child process.

The driver (:mod:`disagg.bench.engine`) starts ``disagg bench engine --system
disagg|transformers --prompts-file F`` for this engine and for transformers
(vLLM's side is ``vllm_peer.py``, in vLLM's environment); each reads the
shared prompts, warms up, times every batch and the one prefill prompt, and
returns the result the driver compares::

    {"system", "version", "torch", "dtype", "threads", "cpu_count",
     "runs": {"8": {"seconds", "tokens_per_s", "outputs": [[ids], ...]}, ...},
     "prefill": {"prompt_len", "seconds", "tokens_per_s", "first_token"} | None}
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time

import torch

import disagg


def bench_disagg(a: argparse.Namespace, spec: dict) -> dict:
    """This engine on ``spec``'s prompts (``--system disagg``): per-batch runs, the prefill."""
    from disagg.engine import LLMEngine
    from disagg.engine_args import engine_config_from_args
    from disagg.sampling_params import SamplingParams

    sizes = [len(p) for p in spec["batches"].values()]
    overrides = dict(max_num_seqs=max(sizes))
    if a.num_kv_blocks is None:
        # Room for the largest batch at full length, or the prefill prompt (plus
        # slack), so the run measures steady batching rather than preemption.
        per_req = -(-(a.prompt_len + a.output_len) // a.block_size)
        prefill = -(-(len(spec["prefill"] or ()) + 1) // a.block_size)
        overrides["num_kv_blocks"] = max(max(sizes) * per_req, prefill) + 64
    # The default step budget (2,048 tokens) holds the default 2,048-token prefill
    # prompt in one step; a longer one is chunked, as the engine always does.
    cfg = engine_config_from_args(a, **overrides)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    runs, prefill_run = {}, None
    with LLMEngine(cfg) as engine:
        engine.generate([spec["warmup"]], SamplingParams(max_tokens=4, temperature=0.0))
        for b, prompts in spec["batches"].items():
            dt, outs = _timed(a.device, lambda: engine.generate(prompts, params))
            runs[b] = {"seconds": dt, "tokens_per_s": len(prompts) * a.output_len / dt,
                       "outputs": [o.output_token_ids for o in outs]}
        if spec["prefill"]:
            one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            dt, outs = _timed(a.device, lambda: engine.generate([spec["prefill"]], one))
            prefill_run = _prefill_row(len(spec["prefill"]), dt, outs[0].output_token_ids[0])
    return {"system": "disagg", "version": disagg.__version__, "torch": torch.__version__,
            "dtype": a.dtype, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "runs": runs, "prefill": prefill_run,
            "engine_config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                              if isinstance(getattr(cfg, f.name), (bool, int, float, str))}}


def bench_transformers(a: argparse.Namespace, spec: dict) -> dict:
    """transformers ``generate`` on ``spec``'s prompts (``--system transformers``)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from disagg.model import resolve_model_dir
    model_dir = str(resolve_model_dir(a.model))
    dtype = getattr(torch, a.dtype)
    if a.load_format == "dummy":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(a.device).eval()
    gen_cfg = copy.deepcopy(model.generation_config)
    # Go on past EOS like the engine's ignore_eos. An empty list is what does
    # it: None falls back to the model config's EOS and stops early, and
    # min_new_tokens would forbid EOS instead of generating through it.
    gen_cfg.eos_token_id = []
    gen_cfg.do_sample = False
    if gen_cfg.pad_token_id is None:    # every prompt has one length: nothing is padded
        gen_cfg.pad_token_id = 0

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=a.device)    # (B, T)
        cfg = copy.deepcopy(gen_cfg)
        cfg.max_new_tokens = n
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return out[:, ids.shape[1]:].tolist()

    runs, prefill_run = {}, None
    with torch.inference_mode():
        generate([spec["warmup"]], 4)
        for b, prompts in spec["batches"].items():
            dt, outs = _timed(a.device, lambda: generate(prompts, a.output_len))
            runs[b] = {"seconds": dt, "tokens_per_s": len(prompts) * a.output_len / dt,
                       "outputs": outs}
        if spec["prefill"]:
            dt, outs = _timed(a.device, lambda: generate([spec["prefill"]], 1))
            prefill_run = _prefill_row(len(spec["prefill"]), dt, outs[0][0])
    return {"system": "transformers", "version": transformers.__version__,
            "torch": torch.__version__, "dtype": a.dtype, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "runs": runs, "prefill": prefill_run}


def _timed(device: str, fn) -> tuple[float, object]:
    """Seconds ``fn()`` took (device work included) and what it returned."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _prefill_row(prompt_len: int, seconds: float, first_token: int) -> dict:
    return {"prompt_len": prompt_len, "seconds": seconds,
            "tokens_per_s": prompt_len / seconds, "first_token": int(first_token)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
