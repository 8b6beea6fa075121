"""The ``disagg`` command: one entry point, one subcommand per job.

    disagg generate "prompt" ...    offline generation with the engine
    disagg bench engine --json      engine throughput vs transformers generate and vLLM
    disagg bench transfer --json    KV transfer GB/s vs raw pyzmq and memcpy
    disagg bench router --json      latency the router adds per request
    disagg serve                    router + prefill node + decode node on this machine
    disagg replay --trace F --base-url URL   replay a trace against any OpenAI endpoint
    disagg experiment               colocated vs disaggregated vs conditional, one report
    disagg router ...               the router (HTTP + control plane)
    disagg prefill-node ...         a prefill node (connects to a router)
    disagg decode-node ...          a decode node (connects to a router)
"""

from __future__ import annotations

import argparse
import json
import sys

from disagg.config import DTYPE_CHOICES, EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that starts an engine."""
    d = EngineConfig()
    p.add_argument("--model", default=d.model,
                   help="'default' (embedded SmolLM2-135M-Instruct), a local HF directory, or a hub id")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int,
                   default=d.tensor_parallel_size, help="tensor-parallel degree (must divide the heads)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16 or AMX, "
                        "float32 on other CPUs (or $DISAGG_DTYPE)")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--kv-cache-memory", default="256MiB", help="KV cache budget per rank, e.g. 512MiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="override the block count")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="per-step token budget (decodes + prefill chunks)")
    p.add_argument("--max-prefill-chunk", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default=d.attention_backend,
                   choices=["auto", "torch", "cpu", "flashinfer"],
                   help="auto: FlashInfer on CUDA, the C++ kernels on a CPU (torch if they are off)")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="run the PyTorch reference path instead of the C++ CPU kernels")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads per rank (default: this process's usable cores / TP)")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="'dummy' = random weights at the model's real shapes (speed tests only)")


def engine_config_from_args(a: argparse.Namespace, **overrides) -> EngineConfig:
    """Build an :class:`EngineConfig` from parsed ``add_engine_args`` flags."""
    kw = dict(model=a.model, tensor_parallel_size=a.tensor_parallel_size, dtype=a.dtype,
              device=a.device, block_size=a.block_size, kv_cache_memory=a.kv_cache_memory,
              num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens,
              max_prefill_chunk=a.max_prefill_chunk, max_model_len=a.max_model_len,
              enable_prefix_caching=not a.no_prefix_caching,
              attention_backend=a.attention_backend, load_format=a.load_format,
              torch_threads=a.torch_threads, cpu_kernels=not a.no_cpu_kernels)
    kw.update(overrides)
    return EngineConfig(**kw)


def _cmd_generate(a: argparse.Namespace) -> int:
    from disagg.engine import LLMEngine
    from disagg.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, seed=a.seed, stop=tuple(a.stop or ()))
    with LLMEngine(engine_config_from_args(a)) as engine:
        prompts = a.prompts
        if a.chat and engine.tokenizer is not None:
            prompts = [engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts]
        outs = engine.generate(prompts, params, progress=True)
    for prompt, out in zip(a.prompts, outs):
        if a.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.output_token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(f"--- {prompt!r}\n{out.text}\n[{out.finish_reason}, {len(out.output_token_ids)} tokens]")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from disagg.bench.engine import run_engine_bench
    result = run_engine_bench(a)
    print(json.dumps(result, indent=None if a.json else 2))
    return 0


def _cmd_bench_transfer(a: argparse.Namespace) -> int:
    from disagg.bench.transfer import run_transfer_bench
    print(json.dumps(run_transfer_bench(a), indent=None if a.json else 2))
    return 0


def _cmd_bench_router(a: argparse.Namespace) -> int:
    from disagg.bench.router import run_router_bench
    print(json.dumps(run_router_bench(a), indent=None if a.json else 2))
    return 0


def _cmd_node(a: argparse.Namespace) -> int:
    from disagg.node.launch import run_node
    return run_node(a, a.role)


def _cmd_router(a: argparse.Namespace) -> int:
    from router.launch import run_router
    return run_router(a)


def _cmd_serve(a: argparse.Namespace) -> int:
    from disagg.serve import run_serve
    return run_serve(a)


def _cmd_replay(a: argparse.Namespace) -> int:
    from disagg.replay.commands import run_replay_command
    return run_replay_command(a)


def _cmd_experiment(a: argparse.Namespace) -> int:
    from disagg.replay.experiment import run_experiment
    return run_experiment(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline with the engine")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--json", action="store_true")
    add_engine_args(g)
    g.set_defaults(func=_cmd_generate)

    from disagg.serve import add_serve_args
    s = sub.add_parser("serve", help="serve the model locally: router + prefill node + decode node")
    add_serve_args(s)
    s.set_defaults(func=_cmd_serve)

    from disagg.node.launch import add_node_args
    for role in ("prefill", "decode"):
        n = sub.add_parser(f"{role}-node", help=f"run a {role} node (connects to a router)")
        add_node_args(n, role)
        n.set_defaults(func=_cmd_node, role=role)
    from router.launch import add_router_args
    r = sub.add_parser("router", help="run the router (OpenAI HTTP endpoint + control plane)")
    add_router_args(r)
    r.set_defaults(func=_cmd_router)

    from disagg.replay.commands import add_replay_args
    rp = sub.add_parser("replay", help="replay a request trace against an OpenAI-compatible "
                                       "endpoint; write a report (tables, plots, raw results)")
    add_replay_args(rp)
    rp.set_defaults(func=_cmd_replay)
    from disagg.replay.experiment import add_experiment_args
    ex = sub.add_parser("experiment", help="colocated vs always-disaggregated vs conditional "
                                           "serving on the same trace and cores, side by side")
    add_experiment_args(ex)
    ex.set_defaults(func=_cmd_experiment)

    b = sub.add_parser("bench", help="benchmarks (print JSON)")
    bsub = b.add_subparsers(dest="bench", required=True)
    from disagg.bench.engine import add_bench_args
    e = bsub.add_parser("engine", help="engine throughput vs transformers generate and "
                                       "vLLM's CPU build (--baseline)")
    add_bench_args(e)
    add_engine_args(e)
    e.set_defaults(func=_cmd_bench)
    from disagg.bench.transfer import add_transfer_bench_args
    t = bsub.add_parser("transfer", help="KV transfer GB/s over zmq tcp/ipc and shm vs raw "
                                         "pyzmq and memcpy")
    add_transfer_bench_args(t)
    t.set_defaults(func=_cmd_bench_transfer)
    from disagg.bench.router import add_router_bench_args
    rb = bsub.add_parser("router", help="latency the router adds per request (HTTP arrival → "
                                        "decode node, decode node → client), p50/p99")
    add_router_bench_args(rb)
    rb.set_defaults(func=_cmd_bench_router)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f"disagg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
