"""A/B on the GPU of the gate's threshold selection from its logits: per sequence with gate_select (before, the
path kernels/gate.py took until gate_select_rows) against gate_select_rows, every group at once (after).

    python -m kvcache.bench.gate_threshold_ab OUT.json
"""

import json
import statistics
import sys

import torch

from kvcache.methods.gate_model import gate_select, gate_select_rows


def before(logits: torch.Tensor, lens: list[int], Hkv: int, P: int, budget: int | None,
           threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The old path: gate_select per sequence, its picks copied into one padded int32 list."""
    picks = []
    for b, S in enumerate(lens):
        n = -(-S // P)
        scores = torch.softmax(logits[b * Hkv:(b + 1) * Hkv, :n], dim=-1)
        picks.append(gate_select(scores, P, budget, threshold))
    t_max = max(c.shape[1] for c, _ in picks)
    out = torch.zeros((len(picks) * Hkv, t_max), dtype=torch.int32, device=logits.device)
    for b, (c, _) in enumerate(picks):
        out[b * Hkv:(b + 1) * Hkv, :c.shape[1]] = c.to(torch.int32)
    return out, torch.cat([c for _, c in picks]).to(torch.int32)


def after(logits: torch.Tensor, pages: torch.Tensor, Hkv: int, P: int, budget: int | None,
          threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The new path: gate_select_rows over every group at once."""
    c, n = gate_select_rows(logits, pages, P, budget, threshold)
    return c.to(torch.int32), n.to(torch.int32)


def timed(fn, *a, reps: int = 50) -> float:
    """Median us of `reps` calls, each between CUDA events, after 5 warm-up calls."""
    for _ in range(5):
        fn(*a)
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1000)
    return statistics.median(ts)


def main(path: str) -> None:
    """Time both at 32K and 128K, batch 1 and 8, and write the rows to `path`."""
    rows = []
    Hkv, P = 8, 16
    for B in (1, 8):
        for S in (32768, 131072):
            lens = [S] * B
            M = -(-S // P)
            logits = torch.randn((B * Hkv, M), device="cuda") * 3
            for budget, thr in ((None, 2 / (M - 2)), (4096, 2 / (M - 2))):
                cb, nb = before(logits, lens, Hkv, P, budget, thr)
                pages = torch.tensor([-(-S // P) for S in lens], device="cuda").repeat_interleave(Hkv)
                ca, na = after(logits, pages, Hkv, P, budget, thr)
                same = bool((nb == na).all()) and all(
                    sorted(cb[r, :nb[r]].tolist()) == sorted(ca[r, :na[r]].tolist()) for r in range(B * Hkv))
                for rnd in range(3):
                    tb = timed(before, logits, lens, Hkv, P, budget, thr)
                    ta = timed(after, logits, pages, Hkv, P, budget, thr)
                    rows.append({"batch": B, "context": S, "budget": budget, "threshold": thr, "round": rnd,
                                 "before_us": tb, "after_us": ta, "same_pages": same})
                    print(rows[-1], flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": sys.version.split()[0],
               "command": "python -m kvcache.bench.gate_threshold_ab OUT "
                          "(A/B: the gate's threshold selection from its logits, "
                          "per-sequence gate_select loop (before, the old kernels/gate.py path) against "
                          "gate_select_rows (after; pages per row made before timing, as kernels/gate.py takes them "
                          "from the page table on the device); Llama-3-8B's 8 kv heads, pages of 16; CUDA events, "
                          "median of 50, 3 rounds)",
               "rows": rows}, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
