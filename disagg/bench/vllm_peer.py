"""The vLLM side of ``disagg bench engine``, run with the peer environment's Python.

Standalone on purpose: the peer environment (``.peers/vllm``, ``make peers``)
has vLLM but not disagg, so this file imports nothing from disagg, and imports
vLLM only inside :func:`main` (its argument parser can be imported anywhere).
``disagg bench engine --baseline vllm`` runs it as::

    .peers/vllm/bin/python disagg/bench/vllm_peer.py --model DIR --dtype float32 \\
        --prompts PROMPTS.json --output-len 128 --gpu-memory-utilization 0.5

PROMPTS.json is written by the bench, so both sides get the very same ids::

    {"warmup": [ids],                         one short prompt, 4 tokens, untimed
     "batches": {"1": [[ids]], "8": [...]},   batch size -> its prompts
     "prefill": [ids] | null}                 one long prompt, timed with max_tokens=1

vLLM runs in its default configuration except for what it needs to start on a
small CPU machine: ``gpu_memory_utilization`` (on the CPU backend the fraction
of RAM it reserves; its default 0.9 is refused when less is free) comes from
the flag, and the bench sets ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) in
its environment. Generation is greedy, ``ignore_eos=True``, exactly
``--output-len`` tokens, each batch timed end to end as one ``LLM.generate``.

Output: one JSON line on the stdout this process was started with (vLLM's own
logging, which goes to stdout by default, is moved to stderr first)::

    {"system": "vllm", "version": str, "torch": str, "dtype": str, "cpu_count": int,
     "runs": {"1": {"seconds", "tokens_per_s", "outputs": [[ids]]}, ...},
     "prefill": {"prompt_len", "seconds", "tokens_per_s", "first_token"} | null,
     "peer_config": {what was set, and vLLM's effective scheduler/cache config}}

Peak memory is not measured here: the bench samples this whole process tree
from outside, the same way for every side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TextIO


def build_parser() -> argparse.ArgumentParser:
    """The peer's flags (what the bench passes)."""
    p = argparse.ArgumentParser(prog="vllm_peer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local Hugging Face model directory")
    # Copies of disagg.config.DTYPES / LOAD_FORMATS: this file runs where disagg is not
    # installed (see above); tests/test_bench_engine.py checks that they stay equal.
    p.add_argument("--dtype", required=True, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompts", required=True, help="the bench's prompts JSON (see above)")
    p.add_argument("--output-len", type=int, required=True, help="tokens generated per sequence")
    p.add_argument("--gpu-memory-utilization", type=float, required=True,
                   help="on vLLM's CPU backend: the fraction of RAM it reserves")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="'dummy' = random weights (speed only; outputs mean nothing)")
    return p


def _stdout_for_result() -> TextIO:
    """Keep the real stdout for the result line and send everything else to stderr.

    Done on the file descriptors, so the processes vLLM starts inherit it too.
    """
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(result_fd, "w")


def _effective_config(llm) -> dict:
    """A few of vLLM's resolved settings, for the record (None where not found)."""
    cfg = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    picks = {"max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens"),
             "max_num_seqs": ("scheduler_config", "max_num_seqs"),
             "enable_chunked_prefill": ("scheduler_config", "enable_chunked_prefill"),
             "enable_prefix_caching": ("cache_config", "enable_prefix_caching"),
             "block_size": ("cache_config", "block_size"),
             "max_model_len": ("model_config", "max_model_len"),
             "compilation_mode": ("compilation_config", "mode")}
    out = {}
    for key, (section, field) in picks.items():
        value = getattr(getattr(cfg, section, None), field, None)
        out[key] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the peer side and print its JSON line; see the module docstring."""
    args = build_parser().parse_args(argv)
    if args.output_len <= 0:
        raise SystemExit(f"--output-len must be positive, got {args.output_len}")
    with open(args.prompts) as f:
        spec = json.load(f)
    result_out = _stdout_for_result()

    import torch
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    extra = {"load_format": "dummy"} if args.load_format == "dummy" else {}
    llm = LLM(model=args.model, dtype=args.dtype,
              gpu_memory_utilization=args.gpu_memory_utilization, **extra)

    def timed(prompts: list[list[int]], params) -> tuple[float, list[list[int]]]:
        token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(token_prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, [[int(t) for t in o.outputs[0].token_ids] for o in outs]

    print("[vllm_peer] warm-up", file=sys.stderr, flush=True)
    timed([spec["warmup"]], SamplingParams(max_tokens=4, temperature=0.0))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    runs = {}
    for batch, prompts in spec["batches"].items():
        print(f"[vllm_peer] batch {batch}", file=sys.stderr, flush=True)
        dt, outputs = timed(prompts, params)
        runs[batch] = {"seconds": dt, "tokens_per_s": len(prompts) * args.output_len / dt,
                       "outputs": outputs}
    prefill = None
    if spec.get("prefill"):
        print(f"[vllm_peer] prefill of {len(spec['prefill'])} tokens", file=sys.stderr, flush=True)
        dt, outputs = timed([spec["prefill"]],
                            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        prefill = {"prompt_len": len(spec["prefill"]), "seconds": dt,
                   "tokens_per_s": len(spec["prefill"]) / dt, "first_token": outputs[0][0]}

    result = {"system": "vllm", "version": vllm.__version__, "torch": torch.__version__,
              "dtype": args.dtype,
              "cpu_count": os.cpu_count(), "runs": runs, "prefill": prefill,
              "peer_config": {"gpu_memory_utilization": args.gpu_memory_utilization,
                              "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                              "load_format": args.load_format,
                              "everything_else": "vLLM defaults",
                              "effective": _effective_config(llm)}}
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
