"""The `kvcache` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvcache` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="kvcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="bytes read and error per method on synthetic Llama-3-8B-shaped K/V")
    demo.add_argument("--seq-len", type=int, default=4096, help="cached positions (default 4096)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--page-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from kvcache.demo import run_demo

        run_demo(args.seq_len, args.dtype, args.page_size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
