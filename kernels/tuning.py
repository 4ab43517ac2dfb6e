"""Launch parameters of the kernels, in one place: block sizes, warps and how many programs to aim for.

Chosen from sweeps on an H200 at 128K x 1 and 32K x 8, bf16 (bench/results/sweep_h200.json; the SparQ
entries from bench/results/sparq_sweep_h200.json); programs ~ SMs x waves.
"""

from __future__ import annotations

from dataclasses import dataclass

LARGE_SELECT_ITEMS = 1 << 23  # rows x items per row from which the radix select takes TUNING["topk_large"]


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
    # SparQ's scoring pass (splits as stage 1's). 8 warps against 4, H100, step: 128K x 1 103.3-103.8 against
    # 106.1 us, 32K x 1 52.6-53.2 against 53.5-53.9, 128K x 8 505.4-505.7 against 513.6-514.0
    # (bench/results/sparq_finish_b1_131072_h100.json and its siblings).
    "scores": Launch(block_n=512, num_warps=8, programs=528),
    "page_scores": Launch(block_n=512, num_warps=4, programs=528),  # the same pass over Quest's page bounds
    "topk": Launch(block_n=1024, num_warps=4, programs=528),  # radix select digits
    # ... over LARGE_SELECT_ITEMS items or more: more, smaller programs (each one's loop steps wait on their appends'
    # atomics). H100, SparQ 128K x 8 (64 rows): selection 230.8 against 244.2 us, step 514.1 against 527.6 us; at
    # 32K x 8 and 128K x 1 the default stays best (bench/results/sparq_sweep_b8_131072_h100.json and its siblings).
    "topk_large": Launch(block_n=512, num_warps=2, programs=4224),
    "quest": Launch(block_n=64, num_warps=4, programs=1056),  # page bounds (block_n pages per step)
}
