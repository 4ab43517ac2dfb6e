"""`kvcache bench input-checks`: what the server's refusal of NaN and Inf (`--reject-nonfinite`, on by default) costs
per append and per attend, against the in-process call it guards, on the CPU.

The check (kvcache.service.input_limits) sums each decoded tensor in float32 and looks at the one number; it runs
on the server's CPU whatever the store's device. Timed: the check alone on a prefill chunk's k and v and on a
decode step's q and new row, and the in-process append and attend of the same tensors, at SmolLM2-135M's shape
(30 layers, 3 kv heads, 9 query heads, d=64) and at Llama-3-8B's (32 layers, 8 kv heads, 32 query heads,
d=128), float32 on the wire. Medians of `--iters` runs.
"""

from __future__ import annotations

import statistics
import time

import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.bench.timing import median_ms, run_header, write_report
from kvcache.service.input_limits import InputLimits

CPU = torch.device("cpu")
SHAPES = {"smollm2-135m": (30, 3, 9, 64), "llama-3-8b": (32, 8, 32, 128)}


def run(chunk: int, context: int, iters: int) -> dict:
    """Per shape: the check and the call, for a prefill chunk of `chunk` positions and a decode step at `context`."""
    limits = InputLimits(reject_nonfinite=True)
    report: dict = {**run_header(torch.device("cpu")), "chunk": chunk, "context": context, "rows": []}
    for name, (L, Hkv, Hq, d) in SHAPES.items():
        client = InProcessClient(KVCacheConfig(L, Hkv, d, dtype=torch.float32,
                                               device_pages=(context + chunk) // 16 + 8))
        sid = client.create().seq_id
        filler = torch.randn((L, context, Hkv, d))
        client.append(sid, filler, filler)
        k, v = torch.randn((L, chunk, Hkv, d)), torch.randn((L, chunk, Hkv, d))
        q, row = torch.randn((1, Hq, d)), torch.randn((1, Hkv, d))

        def check_append(k=k, v=v):
            limits.check_finite(k, "k")
            limits.check_finite(v, "v")

        def check_attend(q=q, row=row):
            for t, n in ((q, "q"), (row, "new_k"), (row, "new_v")):
                limits.check_finite(t, n)

        def fresh_append(client=client, k=k, v=v):
            s = client.create().seq_id
            t0 = time.perf_counter()
            client.append(s, k, v)
            seconds = time.perf_counter() - t0
            client.free(s)
            return seconds

        append_us = statistics.median(fresh_append() * 1e6 for _ in range(iters))
        check_append_us = median_ms(check_append, iters, CPU) * 1e3
        attend_us = median_ms(lambda client=client, sid=sid, q=q: client.attend([sid], 0, q), iters, CPU) * 1e3
        check_attend_us = median_ms(check_attend, iters, CPU) * 1e3
        row = {"shape": name, "append_us": append_us, "check_append_us": check_append_us,
               "append_cost": check_append_us / append_us, "attend_us": attend_us,
               "check_attend_us": check_attend_us, "attend_cost": check_attend_us / attend_us}
        report["rows"].append(row)
        print(f"{name:<14} append {chunk} positions: {append_us:9.0f} us, check {check_append_us:7.0f} us "
              f"({row['append_cost']:.1%});  decode attend at {context}: {attend_us:7.0f} us, check "
              f"{check_attend_us:5.1f} us ({row['attend_cost']:.1%})")
    return report


def main(args) -> int:
    """Entry of `kvcache bench input-checks`."""
    report = run(args.chunk, args.context, args.iters)
    write_report(report, args.json)
    return 0


def add_arguments(p) -> None:
    """Flags of `kvcache bench input-checks`."""
    p.add_argument("--chunk", type=int, default=256, help="positions per append (default 256, the engine's chunk)")
    p.add_argument("--context", type=int, default=4096, help="positions cached before the decode attend (4096)")
    p.add_argument("--iters", type=int, default=30, help="timed runs per figure (default 30)")
    p.add_argument("--json", help="write the report here")
