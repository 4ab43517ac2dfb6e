"""SparQ decode attention in Triton (docs/sparse-attention.md §1): stage 1 on dim-major keys, radix top-k, stage 2 on
rows.

  stage 1   per (sequence, kv head, split): i1 (the r largest of sum_g |q_g|) and tau_g, then
            only rows i1 of each k_dim page (r runs of P) are read and the approximate logits
            x_g = q_g[i1] . K[:, i1] / tau_g written, with the split's softmax max / sum per query head.
  scores    kvcache.kernels.group_scores: f = mean_g softmax(x_g) over the positions outside the local
            window (the group mean ranks like the sum of §1, step 4), with the first radix histogram
            when the rows are too long to select in registers.
  top-k     kvcache.kernels.topk.select_topk: the window plus the k - l largest f, no sort.
  stage 2   kvcache.kernels.paged_decode MODE_ROWS with alpha: exact softmax over the k rows, alpha_g
            = sum of shat_g over them (the logits recomputed from the rows read, with stage 1's qmask, tau and
            softmax stats), y = alpha * (s . V) + (1 - alpha) * vbar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .csr import PageTableCSR
from .group_scores import group_scores
from .paged_decode import MODE_ROWS, attend_partial_and_merge, dot_precision, plan_splits, sequence_extent
from .softmax_stats import running_softmax_stats
from .topk import LEVELS, select_topk, selects_in_registers, topk_workspace, zero_workspace_row
from .tuning import TUNING


@triton.jit
def _group_query(
    q_ptr, b, h, r, scale, s_qb, s_qh, offs_g, mask_g,
    G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """§1 steps 1-2 for one GQA group: i1 [BLOCK_R] (the r largest of sum_g |q_g|, then zeros), tau_g [BLOCK_G],
    which of the d components are in i1 [D], and the group's queries [BLOCK_G, D] (float32)."""
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :], mask=mask_g[:, None],
                other=0.0).to(tl.float32)
    q_abs = tl.abs(q)
    group = tl.sum(q_abs, axis=0)
    # One sort of d keys instead of r rounds of argmax: the float's bits order like the value
    # (it is >= 0), and the low 16 bits make every key distinct, lower index first on ties.
    key = (group.to(tl.int32, bitcast=True).to(tl.int64) << 16) | (65535 - offs_d).to(tl.int64)
    ranked = tl.sort(key, descending=True)
    threshold = tl.sum(tl.where(offs_d == r - 1, ranked, 0), axis=0)
    chosen = key >= threshold
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    offs_r = tl.arange(0, BLOCK_R)
    i1 = tl.sum(tl.where((slot[None, :] == offs_r[:, None]) & chosen[None, :], offs_d[None, :], 0), axis=1)
    covered = tl.sum(tl.where(chosen[None, :], q_abs, 0.0), axis=1)
    total = tl.sum(q_abs, axis=1)
    # As the reference: tau = sqrt(ratio) / scale, ratio 1 for a head with no mass on i1.
    ratio = tl.where((covered > 0) & (total > 0), covered / tl.where(total > 0, total, 1.0), 1.0)
    return i1, tl.sqrt(ratio) / scale, chosen, q


@triton.jit
def _stage1_kernel(
    q_ptr, kdim_ptr, indptr_ptr, indices_ptr, last_len_ptr,
    logits_ptr, qmask_ptr, tau_ptr, stat_m_ptr, stat_l_ptr, hist0_ptr, hist1_ptr, counters_ptr,
    scale, items_per_split,
    s_qb, s_qh, s_kn, s_kh, s_kd, s_lbh, s_lg, s_ln,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_DOT: tl.constexpr, WS_B0: tl.constexpr, WS_B1: tl.constexpr,
):
    """§1 steps 1-3 on one slice of positions: approximate logits from the r chosen key rows of k_dim."""
    pid_bh = tl.program_id(0).to(tl.int64)  # logits offsets can pass 2^31
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    page_start, _, seq_len = sequence_extent(indptr_ptr, last_len_ptr, b, P)

    offs_g = tl.arange(0, BLOCK_G)
    offs_r = tl.arange(0, BLOCK_R)
    mask_g = offs_g < G
    mask_r = offs_r < R
    # Every program finds i1 and tau itself (a sort of d values): cheaper than a launch of its own.
    i1, tau, chosen, q = _group_query(q_ptr, b, h, R, scale, s_qb, s_qh, offs_g, mask_g, G, D, BLOCK_R)
    if split == 0:
        zero_workspace_row(hist0_ptr, hist1_ptr, counters_ptr, pid_bh, WS_B0, WS_B1)  # rather than a memset
        # For stage 2, which recomputes these logits on the rows it reads (alpha): each head's query with the
        # components outside i1 zeroed, and tau.
        # (q was upcast from its dtype, so the store's cast back is exact.)
        offs_d = tl.arange(0, D)
        tl.store(qmask_ptr + (pid_bh * G + offs_g)[:, None] * D + offs_d[None, :],
                 tl.where(chosen[None, :], q, 0.0).to(qmask_ptr.dtype.element_ty), mask=mask_g[:, None])
        tl.store(tau_ptr + pid_bh * G + offs_g, tau, mask=mask_g)
    q_sel = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + i1[None, :],  # [G, R], from L1
                    mask=mask_g[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    col = h * s_kh + i1.to(tl.int64) * s_kd  # [BLOCK_R]
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    start = split * items_per_split
    end = tl.minimum(start + items_per_split, seq_len)
    NPG: tl.constexpr = BLOCK_N // P
    offs_pg = tl.arange(0, NPG)
    offs_p = tl.arange(0, P)
    for it in range(start, end, BLOCK_N):  # start and BLOCK_N are multiples of P: whole pages per step
        logical_page = it // P + offs_pg
        page_ok = logical_page * P < end
        page = tl.load(indices_ptr + page_start + logical_page, mask=page_ok, other=0).to(tl.int64)
        # §1 step 3: only rows i1 of each page are read, each a contiguous run of P. The mask is
        # per page (constant along P) so the runs load as vectors; rows past the end are masked below.
        k3 = tl.load(
            kdim_ptr + col[:, None, None] + (page * s_kn)[None, :, None] + offs_p[None, None, :],
            mask=mask_r[:, None, None] & page_ok[None, :, None], other=0.0,
        )
        k_cols = tl.reshape(k3, [BLOCK_R, BLOCK_N])
        if USE_DOT:
            x = tl.dot(q_sel.to(k_cols.dtype), k_cols, input_precision=DOT_PRECISION)
        else:  # small groups: FMAs on G rows beat a tensor-core tile padded to 16 rows
            x = tl.sum(q_sel[:, :, None] * k_cols.to(tl.float32)[None, :, :], axis=1)
        x = x / tau[:, None]
        offs_n = it + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        x = tl.where(mask_n[None, :], x, float("-inf"))
        tl.store(logits_ptr + pid_bh * s_lbh + offs_g[:, None] * s_lg + offs_n[None, :] * s_ln, x,
                 mask=mask_g[:, None] & mask_n[None, :])
        m_i, l_i = running_softmax_stats(m_i, l_i, x)
    stat = (pid_bh * num_splits + split) * G + offs_g
    tl.store(stat_m_ptr + stat, m_i, mask=mask_g)
    tl.store(stat_l_ptr + stat, l_i, mask=mask_g)


@dataclass
class Stage1Result:
    """What stage 1 leaves for the selection and stage 2 (all on the device)."""

    logits: torch.Tensor  # [B*Hkv, G, S_pad] float32 approximate logits x_g, a view of position-major memory
    stat_m: torch.Tensor  # [B*Hkv, splits, G] per-split softmax max of x_g
    stat_l: torch.Tensor  # [B*Hkv, splits, G] per-split softmax sum
    qmask: torch.Tensor  # [B*Hkv, G, d] q's dtype: each query head with the components outside i1 zeroed
    tau: torch.Tensor  # [B*Hkv, G] float32 temperatures: x_g = qmask_g . K / tau_g
    items_per_split: int
    workspace: dict[str, torch.Tensor] | None  # kvcache.kernels.topk's, zeroed by stage 1; taken by the first selection

    @property
    def num_splits(self) -> int:
        """Splits of the sequence axis used by stage 1 (and the scoring pass)."""
        return self.stat_m.shape[1]

    @property
    def alpha_inputs(self) -> tuple[torch.Tensor, ...]:
        """What the attention kernel takes to sum alpha over the rows it reads (kvcache.kernels.paged_decode)."""
        return self.qmask, self.tau, self.stat_m, self.stat_l, self.num_splits


def sparq_stage1(
    q: torch.Tensor, k_dim: torch.Tensor, csr: PageTableCSR, r: int, block_n: int | None = None,
    scale: float | None = None,
) -> Stage1Result:
    """§1 steps 1-3 up to the softmax statistics: reads r of d key components per position."""
    B, Hq, D = q.shape
    Hkv, P = k_dim.shape[1], k_dim.shape[3]
    G = Hq // Hkv
    BH = B * Hkv
    dev = q.device
    launch = TUNING["stage1" if r <= 16 else "stage1_wide"]
    block_n = launch.block_n if block_n is None else block_n
    num_splits, items = plan_splits(csr.max_len, BH, block_n, launch.programs)
    row_len = triton.cdiv(csr.max_len, 16) * 16
    block_r = max(16, triton.next_power_of_2(r))
    res = Stage1Result(
        # float32: fp16 logits were tried (half the traffic) and made the selection slower on an H200, as
        # rounding ties many scores on the radix's top 16 bits and the tied candidates are finished serially.
        # Position-major ([B*Hkv, S_pad, G] in memory), chosen when stage 2 still read the G logits of each chosen
        # row for alpha (one 16-byte run where head-major rows cost G sectors a row), with the scoring pass loading
        # each head's logits apart (kvcache.kernels.group_scores). H100, 128K x 8, r=16: step 539-542 us against
        # 559-563 us head-major; 128K x 1 alike (bench/results/sparq_scores_loads_ab_h100.json).
        logits=torch.empty((BH, row_len, G), dtype=torch.float32, device=dev).transpose(1, 2),
        stat_m=torch.empty((BH, num_splits, G), dtype=torch.float32, device=dev),
        stat_l=torch.empty((BH, num_splits, G), dtype=torch.float32, device=dev),
        qmask=torch.empty((BH, G, D), dtype=q.dtype, device=dev),
        tau=torch.empty((BH, G), dtype=torch.float32, device=dev),
        items_per_split=items,
        workspace=topk_workspace(BH, dev, zeroed=False),
    )
    use_dot = G >= 16  # measured on an H200: FMAs on G rows beat a 16-row tensor-core tile for G <= 8
    block_g = max(16, triton.next_power_of_2(G)) if use_dot else triton.next_power_of_2(G)
    _stage1_kernel[(BH, num_splits)](
        q, k_dim, csr.indptr, csr.indices, csr.last_page_len,
        res.logits, res.qmask, res.tau, res.stat_m, res.stat_l,
        res.workspace["hist0"], res.workspace["hist1"], res.workspace["counters"],
        1.0 / math.sqrt(D) if scale is None else scale, items,
        q.stride(0), q.stride(1), k_dim.stride(0), k_dim.stride(1), k_dim.stride(2), *res.logits.stride(),
        HKV=Hkv, G=G, BLOCK_G=block_g, D=D, P=P, R=r, BLOCK_R=block_r, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), USE_DOT=use_dot, WS_B0=LEVELS[0][1], WS_B1=LEVELS[1][1],
        num_warps=launch.num_warps,
    )
    return res


def sparq_select(
    s1: Stage1Result, csr: PageTableCSR, num_kv_heads: int, k: int, local_window: int,
    block_n: int | None = None, topk_block: int | None = None,
) -> torch.Tensor:
    """§1 step 4: positions [B*Hkv, k] (int32, unordered): the local window and the k - l best group-mean shat."""
    BH = s1.logits.shape[0]
    # The selection fills its workspace: only the first one after stage 1 finds it zeroed.
    ws, s1.workspace = (s1.workspace if s1.workspace is not None else topk_workspace(BH, s1.logits.device)), None
    in_registers = selects_in_registers(csr.max_len, BH)
    scores, counts = group_scores(s1.logits, s1.stat_m, s1.stat_l, s1.items_per_split, csr, num_kv_heads,
                                  local_window, ws["hist0"], block_n=block_n, with_hist=not in_registers)
    return select_topk(scores, k, counts["n_valid"], counts["n_total"], csr.max_len, ws, block=topk_block,
                       hist0_done=True, in_registers=in_registers)


def sparq_stage2(
    q: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, value_mean: torch.Tensor, csr: PageTableCSR,
    s1: Stage1Result, positions: torch.Tensor, reallocate: bool = True, scale: float | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§1 steps 5-7: exact attention over the chosen rows, alpha, mean-value reallocation: out, lse."""
    BH, k = positions.shape
    alpha_inputs = s1.alpha_inputs if reallocate else None
    vbar = value_mean.float().reshape(BH, -1) if reallocate else None
    return attend_partial_and_merge(
        q, k_seq, v_seq, csr, k, MODE_ROWS, item_list=positions,
        alpha_inputs=alpha_inputs, value_mean=vbar, scale=scale, block_n=block_n, launch=TUNING["rows"],
    )


def sparq_decode(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    k_dim: torch.Tensor,
    v_seq: torch.Tensor,
    value_mean: torch.Tensor,
    csr: PageTableCSR,
    r: int,
    k: int,
    local_window: int = 0,
    reallocate: bool = True,
    scale: float | None = None,
    block_n: int | None = None,
    topk_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparQ attention of q [B, Hq, d] (§1): out [B, Hq, d] in q's dtype, lse [B, Hq] of the stage-2 scores.

    Parameters as kvcache.methods.sparq, which checks them; value_mean [B, Hkv, d] float32.
    """
    s1 = sparq_stage1(q, k_dim, csr, r, block_n, scale)
    positions = sparq_select(s1, csr, k_seq.shape[1], k, local_window, block_n, topk_block)
    return sparq_stage2(q, k_seq, v_seq, value_mean, csr, s1, positions, reallocate, scale, block_n)
