"""The ``disagg`` command: one entry point, one subcommand per job.

    disagg generate "prompt" ...    offline generation with the engine
    disagg bench engine --json      engine throughput vs transformers generate and vLLM
    disagg bench transfer --json    KV transfer GB/s vs raw pyzmq and memcpy
    disagg bench router --json      latency the router adds per request
    disagg bench serve --json       disagg serve vs vllm serve under vLLM's own serving client
    disagg serve                    router + prefill node + decode node on this machine
    disagg replay --trace F --base-url URL   replay a trace against any OpenAI endpoint
    disagg experiment               colocated vs disaggregated vs conditional, one report
    disagg plan --profile F --target-rate R --max-compute N   prefill/decode nodes to deploy
    disagg router ...               the router (HTTP + control plane)
    disagg prefill-node ...         a prefill node (connects to a router)
    disagg decode-node ...          a decode node (connects to a router)
"""

from __future__ import annotations

import argparse
import json
import sys

from disagg.engine_args import add_engine_args, engine_config_from_args


def _cmd_generate(a: argparse.Namespace) -> int:
    from disagg.engine import LLMEngine
    from disagg.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, seed=a.seed, stop=tuple(a.stop or ()))
    with LLMEngine(engine_config_from_args(a)) as engine:
        prompts = a.prompts
        if a.chat and engine.tokenizer is not None:
            prompts = [engine.tokenizer.render_chat([{"role": "user", "content": p}])
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


def _cmd_bench_serve(a: argparse.Namespace) -> int:
    from disagg.bench.serve import run_serve_bench
    report = run_serve_bench(a)
    print(json.dumps(report, indent=None if a.json else 2))
    return 0 if report["ok"] else 1


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


def _cmd_plan(a: argparse.Namespace) -> int:
    from disagg.planning.command import run_plan
    return run_plan(a)


def build_parser() -> argparse.ArgumentParser:
    """The ``disagg`` parser: one subcommand per job, each with its module's flags."""
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
    from disagg.planning.command import add_plan_args
    pl = sub.add_parser("plan", help="how many prefill and decode nodes (and which TP) reach a "
                                     "target rate within the SLOs at the least compute "
                                     "(simulated from measured node rates)")
    add_plan_args(pl)
    pl.set_defaults(func=_cmd_plan)

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
    from disagg.bench.serve import add_serve_bench_args
    sb = bsub.add_parser("serve", help="disagg serve vs vllm serve (and disagg's local/remote "
                                       "modes) under vLLM's serving client, per request rate")
    add_serve_bench_args(sb)
    sb.set_defaults(func=_cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``disagg`` command; ``ValueError`` / ``RuntimeError`` → message and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f"disagg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
