"""Dense paged decode (flash-decoding over the page table) and the row/page-list attention it generalises.

One program per (sequence, kv head, split) attends all G query heads of the group to a slice
of positions, so each K/V row is read once per group; partial (out, lse) per split are merged
by lse (docs/sparse-attention.md §4) in a second kernel. The positions come from one of three sources:

  MODE_DENSE  every cached position of the sequence (dense attention);
  MODE_ROWS   a list of positions per (sequence, kv head) (SparQ stage 2, §1);
  MODE_PAGES  a list of logical pages per (sequence, kv head) (Quest / gate page selection, §3).

With WITH_ALPHA the program also sums SparQ's approximate scores shat over its rows (§1 step 5): it
recomputes their approximate logits from the K rows it reads, in the same tensor-core product as the exact
scores. The group's G query heads fill only G of the tile's BLOCK_G >= 16 rows, so rows G..2G-1 carry each
head's query masked to SparQ's i1 (stage 1's qmask); their products over i1, over tau, are stage 1's logits,
and stage 1's softmax stats turn them into shat. An earlier recompute in a second dot per tile made stage 2
at 128K x 8 on an H200 take 167 us against 92 us with no alpha. Reading stage 1's logits of the chosen rows
back, stage 2 took 33.0 us at 128K x 1 on an H100 (bench/results/decode_h100_rerun_per_head_loads.json); this
way, 29.6-29.8 us in a later run on an H100 (bench/results/decode_sparq_joint_rank_h100.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .csr import PageTableCSR
from .pdl import pdl_launch, pdl_trigger, pdl_wait
from .row_checksum import row_checksum
from .softmax_stats import merged_softmax_stats
from .tuning import TUNING, Launch

MODE_DENSE, MODE_ROWS, MODE_PAGES = 0, 1, 2


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact for float32 stores (tests), native tensor-core math otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def sequence_extent(indptr_ptr, last_len_ptr, b, P: tl.constexpr):
    """(first page index in the CSR indices, number of pages, cached positions) of sequence b."""
    page_start = tl.load(indptr_ptr + b)
    num_pages = tl.load(indptr_ptr + b + 1) - page_start
    return page_start, num_pages, tl.maximum(num_pages - 1, 0) * P + tl.load(last_len_ptr + b)


@triton.jit
def _attend_partial_kernel(
    q_ptr, k_ptr, v_ptr,
    indptr_ptr, indices_ptr, last_len_ptr,
    list_ptr, list_len_ptr,
    qmask_ptr, tau_ptr, stat_m_ptr, stat_l_ptr,
    out_ptr, lse_ptr, alpha_ptr,
    ksum_ptr, vsum_ptr, bad_ptr, s_sn, s_sh,
    sm_scale, items_per_split, num_stat_splits, list_items,
    s_qb, s_qh,
    s_kn, s_kh, s_kp,
    s_list,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr, MODE: tl.constexpr, WITH_ALPHA: tl.constexpr, BLOCK_STAT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_LIST_LEN: tl.constexpr, PDL: tl.constexpr,
    VERIFY: tl.constexpr, BITS: tl.constexpr,
):
    pdl_trigger(PDL)
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // HKV
    h = pid_bh % HKV

    # q and the page table were in place when the step began; the lists are the previous kernel's.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    mask_g = offs_g < G
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    if WITH_ALPHA:  # rows G..2G-1 of the tile: each head's query masked to i1 (see the module's docstring)
        offs_a = offs_g - G
        mask_a = (offs_g >= G) & (offs_a < G)
        q += tl.load(qmask_ptr + (pid_bh.to(tl.int64) * G + offs_a)[:, None] * D + offs_d[None, :],
                     mask=mask_a[:, None], other=0.0)
    page_start, _, seq_len = sequence_extent(indptr_ptr, last_len_ptr, b, P)
    pdl_wait(PDL)
    if MODE == 0:
        num_items = seq_len
    elif not HAS_LIST_LEN:  # every list is full: list_items entries (SparQ's k)
        num_items = list_items
    elif MODE == 1:
        num_items = tl.load(list_len_ptr + pid_bh)
    else:
        num_items = tl.load(list_len_ptr + pid_bh) * P
    start = pid_split * items_per_split
    end = tl.minimum(start + items_per_split, num_items)

    if WITH_ALPHA:
        # Stage-1 softmax stats and tau of each query head, merged over the stage-1 splits, on the tile rows that
        # carry its masked query.
        glob_m, glob_l = merged_softmax_stats(stat_m_ptr, stat_l_ptr, pid_bh, num_stat_splits, offs_a, mask_a,
                                              G, BLOCK_STAT)
        inv_l = tl.where(mask_a & (glob_l > 0), 1.0 / tl.where(glob_l > 0, glob_l, 1.0), 0.0)
        inv_tau = 1.0 / tl.load(tau_ptr + pid_bh * G + offs_a, mask=mask_a, other=1.0)
        alpha_acc = tl.zeros([BLOCK_G], dtype=tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    num_wrong = 0  # rows that failed their checksum (VERIFY): one atomic per program, after the loop
    for it in range(start, end, BLOCK_N):
        offs_n = it + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        if MODE == 0:
            pos = offs_n
        elif MODE == 1:
            pos = tl.load(list_ptr + pid_bh * s_list + offs_n, mask=mask_n, other=0)
        else:
            logical_page = tl.load(list_ptr + pid_bh * s_list + offs_n // P, mask=mask_n, other=0)
            pos = logical_page * P + offs_n % P
            mask_n = mask_n & (pos < seq_len)
        page = tl.load(indices_ptr + page_start + pos // P, mask=mask_n, other=0).to(tl.int64)
        row = page * s_kn + h * s_kh + (pos % P) * s_kp
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        if VERIFY:  # rows of a lower tier read in place: each checked against its stored checksum
            at = page * s_sn + h * s_sh + pos % P
            want_k = tl.load(ksum_ptr + at, mask=mask_n, other=0)
            want_v = tl.load(vsum_ptr + at, mask=mask_n, other=0)
            wrong = ((row_checksum(k, D, BITS) != want_k.to(tl.uint32, bitcast=True))
                     | (row_checksum(v, D, BITS) != want_v.to(tl.uint32, bitcast=True)))
            num_wrong += tl.sum((wrong & mask_n).to(tl.int32), axis=0)

        products = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if WITH_ALPHA:  # the masked rows' logits x_g = qmask_g . k / tau_g, against their global max
            scores = tl.where(mask_a[:, None], products * inv_tau[:, None], products * sm_scale)
        else:
            scores = products * sm_scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if WITH_ALPHA:  # exp(x_g - max_g): shat_g * l_g; the running softmax of those rows is never stored
            m_safe = tl.where(mask_a, glob_m, m_safe)
        p = tl.exp(scores - m_safe[:, None])
        rescale = tl.exp(m_i - m_safe)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

        if WITH_ALPHA:
            alpha_acc += tl.sum(p, axis=1) * inv_l

    if VERIFY:
        if num_wrong > 0:
            tl.atomic_add(bad_ptr, num_wrong)
    has_rows = l_i > 0
    out = acc / tl.where(has_rows, l_i, 1.0)[:, None]
    lse = tl.where(has_rows, m_i + tl.log(tl.where(has_rows, l_i, 1.0)), float("-inf"))
    part = pid_bh * num_splits + pid_split
    tl.store(out_ptr + (part * G + offs_g)[:, None] * D + offs_d[None, :], out, mask=mask_g[:, None])
    tl.store(lse_ptr + part * G + offs_g, lse, mask=mask_g)
    if WITH_ALPHA:
        tl.store(alpha_ptr + part * G + offs_a, alpha_acc, mask=mask_a)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, part_alpha_ptr, vbar_ptr,
    out_ptr, lse_ptr,
    num_splits,
    s_ob, s_oh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, WITH_ALPHA: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (sequence, query head): the lse merge of §4 over the splits, then SparQ's
    reallocation y = alpha * out + (1 - alpha) * vbar when WITH_ALPHA."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    pid = tl.program_id(0)  # b * HKV * G + h * G + g
    bh = pid // G
    g = pid % G
    b = bh // HKV
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    lse = tl.load(part_lse_ptr + (bh * num_splits + offs_s) * G + g, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_sum = tl.sum(tl.exp(lse - lse_safe), axis=0)  # empty splits weigh 0
    out = tl.zeros([D], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):  # CHUNK_S splits at a time keeps registers bounded
        offs_c = s0 + tl.arange(0, CHUNK_S)
        mask_c = offs_c < num_splits
        idx = (bh * num_splits + offs_c) * G + g
        w = tl.exp(tl.load(part_lse_ptr + idx, mask=mask_c, other=float("-inf")) - lse_safe)
        part = tl.load(part_out_ptr + idx[:, None] * D + offs_d[None, :], mask=mask_c[:, None], other=0.0)
        out += tl.sum(w[:, None] * part, axis=0)
    has = w_sum > 0
    out = out / tl.where(has, w_sum, 1.0)
    lse_out = tl.where(has, lse_safe + tl.log(tl.where(has, w_sum, 1.0)), float("-inf"))
    if WITH_ALPHA:
        alpha = tl.sum(tl.load(part_alpha_ptr + (bh * num_splits + offs_s) * G + g, mask=offs_s < num_splits,
                               other=0.0), axis=0)
        vbar = tl.load(vbar_ptr + bh * D + offs_d)
        out = alpha * out + (1.0 - alpha) * vbar
    head = (bh % HKV) * G + g
    tl.store(out_ptr + b * s_ob + head * s_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + b * (HKV * G) + head, lse_out)


def plan_splits(max_items: int, batch_heads: int, block_n: int, target_programs: int) -> tuple[int, int]:
    """(number of splits, items per split) so at most `target_programs` programs share `max_items` per row."""
    blocks = max(1, triton.cdiv(max_items, block_n))
    # Rounded down: the targets are whole waves of resident programs, and a grid just over one (576
    # programs for 528 at 64 rows) left a nearly empty last wave: SparQ's stage 1 at 128K x 8 on an
    # H200 took 303 us that way and 208 us with 512 programs.
    num_splits = max(1, min(blocks, target_programs // batch_heads, 256))
    items = triton.cdiv(blocks, num_splits) * block_n
    return triton.cdiv(max(max_items, 1), items), items


@dataclass
class Partials:
    """Per-split partial results of the attend kernel, before the merge."""

    out: torch.Tensor  # [B*Hkv, splits, G, d] float32
    lse: torch.Tensor  # [B*Hkv, splits, G] float32
    alpha: torch.Tensor | None  # [B*Hkv, splits, G] float32 SparQ alpha sums, when computed

    @staticmethod
    def concat(parts: list[Partials]) -> Partials:
        """The splits of several launches over disjoint items of the same (sequence, kv head)s."""
        if len(parts) == 1:
            return parts[0]
        alpha = None if parts[0].alpha is None else torch.cat([p.alpha for p in parts], dim=1)
        return Partials(torch.cat([p.out for p in parts], dim=1), torch.cat([p.lse for p in parts], dim=1), alpha)


def attend_partial(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    max_items: int,
    mode: int,
    item_list: torch.Tensor | None = None,
    list_len: torch.Tensor | None = None,
    alpha_inputs: tuple[torch.Tensor, ...] | None = None,
    scale: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    launch: Launch | None = None,
    pdl: bool = False,
    row_sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Partials:
    """Run the partial kernel over (B*Hkv, splits): per-split out, lse (and alpha) for merge_partials.

    k_seq and v_seq [N, Hkv, P, d] must have the same strides; they may be views of a pinned host
    tensor (the GPU reads those rows over PCIe) as long as csr.indices address that pool.
    alpha_inputs = (qmask [B*Hkv, G, d] q's dtype, tau [B*Hkv, G], stat_m, stat_l [B*Hkv, S1, G], S1) from SparQ's
    stage 1 turns on its alpha (items are then positions). Without list_len every list holds max_items items (no
    per-row count to read). `launch` overrides TUNING['decode']. With `pdl` (kvcache.kernels.pdl) it launches as
    following the kernel before it (the one that made its lists). With row_sums = (k_sums, v_sums [N, Hkv, P] int32,
    bad [1] int32) every row read is checked against its checksum (kvcache.kernels.row_checksum) and bad counts those
    that differ.
    """
    B, Hq, D = q.shape
    _, Hkv, P, _ = k_seq.shape
    G = Hq // Hkv
    BH = B * Hkv
    if k_seq.stride() != v_seq.stride():
        raise ValueError(f"k and v pools differ in strides: {k_seq.stride()} vs {v_seq.stride()}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    launch = TUNING["decode"] if launch is None else launch
    block_n = launch.block_n if block_n is None else block_n
    if num_splits is None:
        num_splits, items = plan_splits(max_items, BH, block_n, launch.programs)
    else:
        items = triton.cdiv(triton.cdiv(max(max_items, 1), num_splits), block_n) * block_n
    dev = q.device
    part_out = torch.empty((BH, num_splits, G, D), dtype=torch.float32, device=dev)
    part_lse = torch.empty((BH, num_splits, G), dtype=torch.float32, device=dev)
    with_alpha = alpha_inputs is not None
    part_alpha = torch.empty((BH, num_splits, G), dtype=torch.float32, device=dev) if with_alpha else part_lse
    if with_alpha:
        qmask, tau, stat_m, stat_l, stat_splits = alpha_inputs
    else:
        qmask, tau, stat_m, stat_l, stat_splits = part_lse, part_lse, part_lse, part_lse, 1
    dummy = csr.indptr
    item_list = dummy if item_list is None else item_list
    has_list_len = list_len is not None
    list_len = dummy if list_len is None else list_len
    block_g = max(16, triton.next_power_of_2(2 * G if with_alpha else G))  # alpha: G more rows (masked queries)
    verify = row_sums is not None
    if verify:
        k_sums, v_sums, bad = row_sums
        if k_sums.stride() != v_sums.stride() or k_sums.stride(2) != 1:
            raise ValueError(f"k and v row sums must share strides with rows contiguous: {k_sums.stride()}, "
                             f"{v_sums.stride()}")
    else:
        k_sums = v_sums = bad = dummy
    _attend_partial_kernel[(BH, num_splits)](
        q, k_seq, v_seq,
        csr.indptr, csr.indices, csr.last_page_len,
        item_list, list_len,
        qmask, tau, stat_m, stat_l,
        part_out, part_lse, part_alpha,
        k_sums, v_sums, bad, k_sums.stride(0) if verify else 0, k_sums.stride(1) if verify else 0,
        scale, items, stat_splits, max_items,
        q.stride(0), q.stride(1),
        k_seq.stride(0), k_seq.stride(1), k_seq.stride(2),
        item_list.stride(0) if item_list.dim() == 2 else 0,
        HKV=Hkv, G=G, BLOCK_G=block_g, D=D, P=P, BLOCK_N=block_n, MODE=mode, WITH_ALPHA=with_alpha,
        BLOCK_STAT=triton.next_power_of_2(stat_splits), DOT_PRECISION=dot_precision(q.dtype),
        HAS_LIST_LEN=has_list_len, PDL=pdl, VERIFY=verify, BITS=8 * k_seq.element_size(),
        num_warps=launch.num_warps, **pdl_launch(pdl),
    )
    return Partials(part_out, part_lse, part_alpha if with_alpha else None)


def merge_partials(
    q: torch.Tensor, parts: Partials, num_kv_heads: int, value_mean: torch.Tensor | None = None, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split partials by lse (§4): out [B, Hq, d] (q dtype), lse [B, Hq] f32.

    With alpha partials, SparQ's mean-value reallocation uses value_mean [B*Hkv, d] f32. With `pdl`
    (kvcache.kernels.pdl) it is launched as following the partial kernel.
    """
    B, Hq, D = q.shape
    G = Hq // num_kv_heads
    num_splits = parts.out.shape[1]
    with_alpha = parts.alpha is not None
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    part_alpha = parts.alpha if with_alpha else parts.lse
    vbar = value_mean.contiguous() if with_alpha else parts.lse
    _merge_kernel[(B * Hq,)](
        parts.out, parts.lse, part_alpha, vbar,
        out, lse,
        num_splits,
        out.stride(0), out.stride(1),
        HKV=num_kv_heads, G=G, D=D,
        BLOCK_S=triton.next_power_of_2(num_splits), CHUNK_S=min(16, triton.next_power_of_2(num_splits)),
        WITH_ALPHA=with_alpha, PDL=pdl, **pdl_launch(pdl),
    )
    return out, lse


def attend_partial_and_merge(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    max_items: int,
    mode: int,
    item_list: torch.Tensor | None = None,
    list_len: torch.Tensor | None = None,
    alpha_inputs: tuple[torch.Tensor, ...] | None = None,
    value_mean: torch.Tensor | None = None,
    scale: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    launch: Launch | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_partial then merge_partials: out [B, Hq, d] (q dtype), lse [B, Hq] f32. With `pdl` (kvcache.kernels.pdl)
    both launch as following the kernel before them: the partial kernel the one that made its lists."""
    parts = attend_partial(q, k_seq, v_seq, csr, max_items, mode, item_list, list_len, alpha_inputs, scale,
                           block_n, num_splits, launch, pdl=pdl)
    return merge_partials(q, parts, k_seq.shape[1], value_mean, pdl=pdl)


def paged_decode(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    scale: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention of q [B, Hq, d] over the paged K/V [N, Hkv, P, d]: out [B, Hq, d], lse [B, Hq]."""
    return attend_partial_and_merge(
        q, k_seq, v_seq, csr, csr.max_len, MODE_DENSE, scale=scale, block_n=block_n, num_splits=num_splits
    )
