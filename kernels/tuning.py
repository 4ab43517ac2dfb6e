"""Launch parameters of the kernels, in one place: block sizes, warps and how many programs to aim for.

Chosen from a sweep on an H200 (bench/results/sweep_h200.json) at 128K x 1 and 32K x 8, bf16;
programs ~ SMs x waves.
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
    "stage1": Launch(block_n=256, num_warps=4, programs=528),  # SparQ stage 1 and its scoring pass
    "topk": Launch(block_n=2048, num_warps=4, programs=1056),  # radix select levels
    "quest": Launch(block_n=64, num_warps=4, programs=1056),  # page bounds (block_n pages per step)
}
