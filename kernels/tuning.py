"""Launch parameters of the kernels, in one place: block sizes, warps and how many programs to aim for.

Chosen from sweeps on an H200 at 128K x 1 and 32K x 8, bf16 (bench/results/sweep_h200.json; the SparQ
entries from bench/results/sparq_sweep_h200.json); programs ~ SMs x waves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Launch:
    """Positions per loop step, warps per program, and the number of programs to spread a batch over."""

    block_n: int
    num_warps: int
    programs: int


TUNING: dict[str, Launch] = {
    "decode": Launch(block_n=128, num_warps=4, programs=264),  # paged_decode partial kernel (all modes)
    "rows": Launch(block_n=128, num_warps=4, programs=264),  # paged_decode over SparQ's chosen rows (stage 2)
    "stage1": Launch(block_n=256, num_warps=4, programs=528),  # SparQ stage 1, r <= 16
    "stage1_wide": Launch(block_n=256, num_warps=2, programs=528),  # SparQ stage 1, r > 16
    "scores": Launch(block_n=512, num_warps=4, programs=528),  # SparQ's scoring pass (splits as stage 1's)
    "topk": Launch(block_n=1024, num_warps=4, programs=528),  # radix select digits
    "quest": Launch(block_n=64, num_warps=4, programs=1056),  # page bounds (block_n pages per step)
}
