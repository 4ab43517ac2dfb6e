"""SparQ on an untiered CPU store in few operations: the same selection and attention as the torch reference
(docs/sparse-attention.md §1), with the index arithmetic in numpy and the attention over the chosen rows in the CPU
flash kernel.

At 8K positions a layer call of the reference ran hundreds of torch operations, most on a few hundred elements, where
each costs microseconds whatever its size: the call's time was their count, not the 1/8 of the bytes it reads
(docs/engine.md, "Decode on the CPU"). Here the per-position work is a handful of operations per sequence: one
gather of the r key components, one product, one softmax, one partial sort, one gather of the k rows per pool, one
flash call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvcache.kernels.csr import PageTableCSR
from kvcache.methods.gather import runs_view
from kvcache.methods.result import AttentionResult

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# top_per_row's sample: every SAMPLE_STRIDE-th score, and how far below the sample's own rank the threshold sits.
SAMPLE_STRIDE = 16
SAMPLE_MARGIN = 1.5


def top_per_row(scores: np.ndarray, n: int, out: np.ndarray) -> np.ndarray:
    """The indices of each row's n largest scores [R, n] (unordered; any choice among equal scores), written to out.

    Exact, as a partial sort of the whole row is, at a fraction of its cost: a threshold under the n-th largest
    score is read off a strided sample (its SAMPLE_MARGIN * n / SAMPLE_STRIDE-th largest); where at least n scores
    of a row exceed it, none of the others can be among its n largest, and only those few are sorted. A row with
    fewer falls back to the whole partial sort. Three rows of 8K scores on the 2-core machine: 180-210 us sorted whole,
    53-60 us this way (docs/engine.md, "Decode on the CPU")."""
    rows, m = scores.shape
    sample = scores[:, ::SAMPLE_STRIDE]
    rank = min(sample.shape[1] - 1, int(SAMPLE_MARGIN * n / SAMPLE_STRIDE) + 1)
    if n >= m or rank >= sample.shape[1] - 1:
        out[:] = np.argpartition(scores, m - n, axis=1)[:, m - n :]
        return out
    threshold = -np.partition(-sample, rank, axis=1)[:, rank]  # each row's (rank+1)-th largest sampled score
    above = scores > threshold[:, None]
    for i in range(rows):
        candidates = np.flatnonzero(above[i])
        c = len(candidates)
        if c < n:
            out[i] = np.argpartition(scores[i], m - n)[m - n :]
        else:
            out[i] = candidates[np.argpartition(scores[i, candidates], c - n)[c - n :]]
    return out


def sparq_cpu(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    k_dim: torch.Tensor,
    v_seq: torch.Tensor,
    value_mean: torch.Tensor,
    csr: PageTableCSR,
    r: int,
    k: int,
    local_window: int,
    reallocate: bool,
    scale: float | None,
    nbytes: int,
) -> AttentionResult:
    """SparQ of q [B, Hq, d] over a CPU pool (parameters already checked): out [B, Hq, d] in q's dtype, lse [B, Hq]
    of the exact scores over the chosen rows, coverage [B, Hq] (alpha); `nbytes` is the bytes_read it reports."""
    B, Hq, d = q.shape
    _, Hkv, P, _ = k_seq.shape
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32)
    alphas = torch.empty((B, Hkv, G), dtype=torch.float32)
    q_np = q.detach().float().reshape(B, Hkv, G, d).numpy()
    # §1 steps 1-2 for the whole batch: the r components with the largest |q| summed over the group, and each query
    # head's 1/tau from the L1 mass of q they cover (a head with none keeps ratio 1), folded into q's r components.
    q_abs = np.abs(q_np)
    i1_all = np.argpartition(q_abs.sum(axis=2), d - r, axis=2)[:, :, d - r :]  # [B, Hkv, r]
    q_i1_all = torch.gather(torch.from_numpy(q_np), 3, torch.from_numpy(i1_all)[:, :, None, :].expand(B, Hkv, G, r))
    q_i1_np = q_i1_all.numpy()
    covered = np.abs(q_i1_np).sum(-1)
    inv_tau = np.divide(q_abs.sum(-1), covered, out=np.ones_like(covered), where=covered > 0)
    np.sqrt(inv_tau, out=inv_tau)
    inv_tau *= scale
    q_i1_np *= inv_tau[..., None]
    # The pools as [runs, width] views from their first element: a run is a page's P values of one key dim
    # (dim-major) or one row of d values (sequence-major).
    dim_runs, k_rows, v_rows = runs_view(k_dim, P), runs_view(k_seq, d), runs_view(v_seq, d)
    s_page, s_head, s_dim, _ = (s // P for s in k_dim.stride())
    r_page, r_head, r_row, _ = (s // d for s in k_seq.stride())
    heads = np.arange(Hkv)
    head_runs = heads[:, None, None] * s_head
    # Where the page axis lies next to the positions (the store's layout), a sequence on consecutive page ids has
    # each key dim of a head in one run of its S values: r rows of a [Hkv * d, N * P] view, not r * pages runs of P.
    by_dim = k_dim.permute(1, 2, 0, 3).reshape(Hkv * d, -1) if s_page == 1 and s_head == d * s_dim else None
    head_rows = heads[:, None] * r_head
    indptr = csr.indptr.tolist()
    indices = csr.indices.numpy()
    out_groups = out.view(B, Hkv, G, d)
    i2 = np.empty((Hkv, k), dtype=np.int64)
    for b, S in enumerate(csr.host_lens):
        pages = indices[indptr[b] : indptr[b + 1]].astype(np.int64)
        # §1 step 3: the r components of every key, read as runs of P from the dim-major pool -> [Hkv, r, S].
        if by_dim is not None and len(pages) and pages[-1] - pages[0] == len(pages) - 1 and (np.diff(pages) == 1).all():
            at = int(pages[0]) * P
            dims = torch.from_numpy((i1_all[b] + heads[:, None] * d).reshape(-1))
            k_i1 = by_dim[:, at : at + S].index_select(0, dims).view(Hkv, r, S)
        else:
            run = pages * s_page + (head_runs + i1_all[b][:, :, None] * s_dim)
            k_i1 = dim_runs.index_select(0, torch.from_numpy(run.reshape(-1))).view(Hkv, r, -1)[:, :, :S]
        shat = torch.softmax(torch.bmm(q_i1_all[b], k_i1.float()), dim=-1)  # [Hkv, G, S]
        # §1 step 4: the local window, and the top k - l of the group's mean shat before it (ranked by the sum,
        # the same order).
        free, n = S - local_window, k - local_window
        if n > 0:
            shat_np = shat.numpy()
            group = shat_np[:, 0, :free].copy()
            for g in range(1, G):
                group += shat_np[:, g, :free]
            top_per_row(group, n, out=i2[:, :n])
        i2[:, n:] = np.arange(free, S)
        i2_t = torch.from_numpy(i2)
        # §1 step 5: alpha, the approximate mass the chosen rows cover.
        torch.sum(torch.gather(shat, 2, i2_t[:, None, :].expand(Hkv, G, k)), -1, out=alphas[b])
        # §1 step 6: exact attention over the k chosen rows of K and V (sequence-major reads), one flash call.
        page_index, slot = np.divmod(i2, P)
        row = torch.from_numpy((pages.take(page_index) * r_page + slot * r_row + head_rows).reshape(-1))
        keys = k_rows.index_select(0, row).view(1, Hkv, k, d)
        values = v_rows.index_select(0, row).view(1, Hkv, k, d)
        y, s = _FLASH_CPU(torch.from_numpy(q_np[b][None]).to(keys.dtype), keys, values, 0.0, False, scale=scale)[:2]
        lse[b] = s.reshape(Hq)
        # §1 step 7: mean-value reallocation, alpha * y + (1 - alpha) * mean value.
        if reallocate:
            out_groups[b] = torch.lerp(value_mean[b].float()[:, None, :], y[0].float(), alphas[b][..., None])
        else:
            out_groups[b] = y[0]
    return AttentionResult(out, lse, nbytes, coverage=alphas.view(B, Hq).clamp_(0.0, 1.0))
