"""The `kvcache` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

# Benchmarks whose module gives both add_arguments(parser) and main(args): name -> (module, one line of help).
BENCH_MODULES = {
    "soak": ("kvcache.bench.soak", "many clients against one server with faults injected (client kills, stalls, "
             "corrupted disk pages, bad input): nothing wrong served, nothing kept"),
    "restart": ("kvcache.bench.warm_restart", "time to first token of a repeated prompt after a server restart, "
                "with a persistent disk tier (--disk-dir) and without (SmolLM2 on the CPU)"),
    "input-checks": ("kvcache.bench.input_checks", "what refusing NaN/Inf costs per append and attend"),
    "e2e": ("kvcache.bench.e2e", "whole decode steps of a model through kvcache per method, against a static-cache "
            "baseline (graph-captured SDPA) in the same run"),
    "hf": ("kvcache.bench.hf", "decode steps of a transformers model through its own cache and the kvcache cache "
           "(dense, SparQ), and the integration's overhead over the engine's own step"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvcache` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="kvcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="bytes read and error per method on synthetic Llama-3-8B-shaped K/V")
    demo.add_argument("--seq-len", type=int, default=4096, help="cached positions (default 4096)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--page-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    verify = sub.add_parser("verify", help="scrub a server's host and disk tiers against their checksums; exit 1 "
                                           "if a page failed (it is quarantined: never served)")
    verify.add_argument("--server", required=True, help="host:port of a `kvcache serve`")
    verify.add_argument("--token-file", help="a file holding the server's bearer token")
    serve = sub.add_parser("serve", help="run the gRPC KV cache service")
    from kvcache.service.serve_cli import add_arguments

    add_arguments(serve)
    generate = sub.add_parser("generate", help="generate text with SmolLM2 (or --model) decoding through the KV store")
    from kvcache.engine.cli import add_arguments as add_generate_arguments

    add_generate_arguments(generate)
    evaluate = sub.add_parser("eval", help="accuracy of each decode method against dense on the real model")
    from kvcache.engine.eval_cli import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)
    search = sub.add_parser("search-patterns", help="per-head MInference prefill patterns of a model, saved as JSON")
    from kvcache.engine.pattern_search import add_arguments as add_search_arguments

    add_search_arguments(search)
    train_gate = sub.add_parser("train-gate",
                                help="distil a learned page gate (SeerAttention) from the model's attention")
    from kvcache.engine.train_gate import add_arguments as add_train_gate_arguments

    add_train_gate_arguments(train_gate)
    calibrate = sub.add_parser("calibrate-bytes",
                               help="measure how a model's layers spend attention mass and save its byte allocation")
    from kvcache.engine.byte_calibration import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(calibrate)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    decode = bench_sub.add_parser("decode", help="decode attention time, bytes and bandwidth per method vs SDPA")
    decode.add_argument("--context", help="comma-separated contexts (default GPU 8K..512K, CPU 1K,4K)")
    decode.add_argument("--batch", help="comma-separated batch sizes (default GPU 1,8; CPU 1)")
    decode.add_argument("--methods", default="dense,sparq,quest")
    decode.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    decode.add_argument("--iters", type=int, default=30, help="timed runs per row (median reported)")
    decode.add_argument("--page-size", type=int, default=16, help="positions per page (default 16)")
    decode.add_argument("--json", help="write the report here")
    rpc = bench_sub.add_parser("rpc", help="decode-step latency and throughput, in-process vs gRPC on loopback")
    rpc.add_argument("--context", type=int, default=4096, help="cached positions per sequence (default 4096)")
    rpc.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    rpc.add_argument("--steps", type=int, default=5, help="timed decode steps per row (median reported)")
    rpc.add_argument("--engines", type=int, default=4,
                     help="concurrent engine processes, each its own connection, in the last row")
    rpc.add_argument("--device", default="cpu", help="where both stores live: cpu (default) or cuda")
    rpc.add_argument("--server-cpus", help="run the server on these CPUs (kvcache serve --cpus), e.g. 1 or 8-15")
    rpc.add_argument("--engine-cpus", help="run this process and its engine processes on these CPUs, e.g. 0 or 0-7")
    rpc.add_argument("--json", help="write the report here")
    rpc_floor = bench_sub.add_parser("rpc-floor", help="the least gRPC can add per layer call: a bare attend-shaped "
                                                       "round trip, and waiting for an in-process call's result")
    rpc_floor.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the bare server and the "
                                                          "store put tensors")
    rpc_floor.add_argument("--context", type=int, default=4096, help="cached positions of the in-process store")
    rpc_floor.add_argument("--calls", type=int, default=2000, help="timed round trips and layer calls of each kind")
    rpc_floor.add_argument("--server-cpus", help="run the bare server on these CPUs, e.g. 8-15")
    rpc_floor.add_argument("--engine-cpus", help="run this process on these CPUs, e.g. 0-7")
    rpc_floor.add_argument("--hold-us", type=float, default=0.0,
                           help="also time round trips whose bare server works this long before answering (subtracted)")
    rpc_floor.add_argument("--json", help="write the report here")
    layer_call = bench_sub.add_parser("layer-call", help="a decode layer call's append and whole wall time, "
                                                         "in-process (Triton append against torch)")
    layer_call.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    layer_call.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    layer_call.add_argument("--iters", type=int, default=300, help="timed calls per row")
    layer_call.add_argument("--json", help="write the report here")
    dense_cpu = bench_sub.add_parser("dense-cpu", help="dense decode on a CPU store: the CPU path vs the reference")
    from kvcache.bench.dense_cpu import add_arguments as add_dense_cpu_arguments

    add_dense_cpu_arguments(dense_cpu)
    prefill = bench_sub.add_parser("prefill", help="MInference sparse prefill vs SDPA, one layer")
    from kvcache.bench.prefill import add_arguments as add_prefill_arguments

    add_prefill_arguments(prefill)
    star = bench_sub.add_parser("star", help="Star Attention: decode-step time against the number of KV servers; "
                                             "--accuracy: perplexity and agreement against dense")
    from kvcache.bench.star import add_arguments as add_star_arguments

    add_star_arguments(star)
    star_phase1 = bench_sub.add_parser("star-phase1", help="Star Attention phase 1 (N ranks) against one rank's "
                                                           "full causal prefill; under torchrun, one rank per device")
    from kvcache.bench.star_phase1 import add_arguments as add_star_phase1_arguments

    add_star_phase1_arguments(star_phase1)
    bench_all = bench_sub.add_parser("all", help="the benchmarks behind docs/methods.md's headline table in one run "
                                                 "(a GPU run of minutes); writes bench/results/headline_<card>.json")
    from kvcache.bench.all import add_arguments as add_all_arguments

    add_all_arguments(bench_all)
    offload = bench_sub.add_parser("offload", help="decode steps over K/V offloaded to pinned host memory")
    offload.add_argument("--context", default="131072,524288", help="comma-separated contexts")
    offload.add_argument("--device-tokens", type=int, default=8192, help="positions whose K/V stay on the device")
    offload.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    offload.add_argument("--iters", type=int, default=10, help="timed steps per row (median reported)")
    offload.add_argument("--json", help="write the report here")
    for name, (module, text) in BENCH_MODULES.items():  # each module gives its flags and its main
        importlib.import_module(module).add_arguments(bench_sub.add_parser(name, help=text))
    args = parser.parse_args(argv)
    if args.command == "bench" and args.bench in BENCH_MODULES:
        return importlib.import_module(BENCH_MODULES[args.bench][0]).main(args)

    if args.command == "verify":
        import json

        from kvcache.clients.remote import RemoteClient

        token = open(args.token_file).read().strip() if args.token_file else None
        with RemoteClient(args.server, token=token) as client:
            report = client.verify()
        print(json.dumps(report))
        return 1 if report["corrupted_pages"] else 0
    if args.command == "demo":
        from kvcache.bench.synthetic_demo import run_demo

        run_demo(args.seq_len, args.dtype, args.page_size, args.seed)
    elif args.command == "serve":
        from kvcache.service.serve_cli import main as serve_main

        return serve_main(args)
    elif args.command == "generate":
        from kvcache.engine.cli import main as generate_main

        return generate_main(args)
    elif args.command == "eval":
        from kvcache.engine.eval_cli import main as eval_main

        return eval_main(args)
    elif args.command == "search-patterns":
        from kvcache.engine.pattern_search import main as search_main

        return search_main(args)
    elif args.command == "calibrate-bytes":
        from kvcache.engine.byte_calibration import main as calibrate_main

        return calibrate_main(args)
    elif args.command == "train-gate":
        from kvcache.engine.train_gate import main as train_gate_main

        return train_gate_main(args)
    elif args.command == "bench" and args.bench == "rpc":
        from kvcache.bench.rpc import main as bench_rpc

        return bench_rpc(args)
    elif args.command == "bench" and args.bench == "rpc-floor":
        from kvcache.bench.rpc_floor import main as bench_rpc_floor

        return bench_rpc_floor(args)
    elif args.command == "bench" and args.bench == "dense-cpu":
        from kvcache.bench.dense_cpu import main as bench_dense_cpu

        return bench_dense_cpu(args)
    elif args.command == "bench" and args.bench == "layer-call":
        from kvcache.bench.layer_call import main as bench_layer_call

        return bench_layer_call(args)
    elif args.command == "bench" and args.bench == "prefill":
        from kvcache.bench.prefill import main as bench_prefill

        return bench_prefill(args)
    elif args.command == "bench" and args.bench == "star":
        from kvcache.bench.star import main as bench_star

        return bench_star(args)
    elif args.command == "bench" and args.bench == "star-phase1":
        from kvcache.bench.star_phase1 import main as bench_star_phase1

        return bench_star_phase1(args)
    elif args.command == "bench" and args.bench == "all":
        from kvcache.bench.all import main as bench_all_main

        return bench_all_main(args)
    elif args.command == "bench" and args.bench == "offload":
        from kvcache.bench.offload import main as bench_offload

        return bench_offload(args)
    elif args.command == "bench" and args.bench == "decode":
        from kvcache.bench.decode import main as bench_decode

        return bench_decode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
