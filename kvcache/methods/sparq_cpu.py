"""SparQ on an untiered CPU store in few operations: the same selection and attention as the torch reference
(docs/sparse-attention.md §1), with the index arithmetic in numpy and the attention over the chosen rows in the CPU
flash kernel.

At 8K positions a layer call of the reference ran about 300 torch operations, most on a few hundred elements, where
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
from kvcache.methods.result import AttentionResult

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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
    i1_all = np.argpartition(-q_abs.sum(axis=2), r - 1, axis=2)[:, :, :r]  # [B, Hkv, r]
    q_i1_all = np.take_along_axis(q_np, i1_all[:, :, None, :], axis=3)  # [B, Hkv, G, r]
    covered, total = np.abs(q_i1_all).sum(-1), q_abs.sum(-1)
    inv_tau = np.sqrt(np.where(covered > 0, total / np.where(covered > 0, covered, 1), 1.0)) * scale
    q_i1_all = q_i1_all * inv_tau[..., None].astype(np.float32)
    # The pools as [runs, width] views of their memory: a run is a page's P values of one key dim (dim-major) or
    # one row of d values (sequence-major).
    dim_runs, dim_base = _runs_view(k_dim, P)
    k_rows, k_base = _runs_view(k_seq, d)
    v_rows, v_base = _runs_view(v_seq, d)
    s_page, s_head, s_dim, _ = (s // P for s in k_dim.stride())
    r_page, r_head, r_row, _ = (s // d for s in k_seq.stride())
    heads = np.arange(Hkv)
    indptr = csr.indptr.tolist()
    indices = csr.indices.numpy()
    out_groups = out.view(B, Hkv, G, d)
    for b, S in enumerate(csr.host_lens):
        pages = indices[indptr[b] : indptr[b + 1]].astype(np.int64)
        # §1 step 3: the r components of every key, read as runs of P from the dim-major pool -> [Hkv, r, S].
        run = pages[None, None, :] * s_page + (heads[:, None, None] * s_head + i1_all[b][:, :, None] * s_dim + dim_base)
        k_i1 = dim_runs.index_select(0, torch.from_numpy(run.reshape(-1))).view(Hkv, r, -1)[:, :, :S]
        shat = torch.softmax(torch.bmm(torch.from_numpy(q_i1_all[b]), k_i1.float()), dim=-1)  # [Hkv, G, S]
        # §1 step 4: the local window, and the top k - l of the group's mean shat before it (ranked by the sum,
        # the same order).
        free, n = S - local_window, k - local_window
        shat_np = shat.numpy()
        group = shat_np[:, 0, :free].copy()
        for g in range(1, G):
            group += shat_np[:, g, :free]
        top = np.argpartition(group, free - n, axis=1)[:, free - n :] if n > 0 else np.empty((Hkv, 0), np.int64)
        i2 = np.concatenate([top, np.broadcast_to(np.arange(free, S), (Hkv, local_window))], axis=1)  # [Hkv, k]
        # §1 step 5: alpha, the approximate mass the chosen rows cover.
        torch.sum(torch.gather(shat, 2, torch.from_numpy(i2)[:, None, :].expand(Hkv, G, k)), -1, out=alphas[b])
        # §1 step 6: exact attention over the k chosen rows of K and V (sequence-major reads), one flash call.
        row = torch.from_numpy((pages[i2 // P] * r_page + (i2 % P) * r_row + heads[:, None] * r_head).reshape(-1))
        keys = k_rows.index_select(0, row + k_base).view(1, Hkv, k, d)
        values = v_rows.index_select(0, row + v_base).view(1, Hkv, k, d)
        y, s = _FLASH_CPU(torch.from_numpy(q_np[b][None]).to(keys.dtype), keys, values, 0.0, False, scale=scale)[:2]
        lse[b] = s.reshape(Hq)
        # §1 step 7: mean-value reallocation, alpha * y + (1 - alpha) * mean value.
        if reallocate:
            out_groups[b] = torch.lerp(value_mean[b].float()[:, None, :], y[0].float(), alphas[b][..., None])
        else:
            out_groups[b] = y[0]
    return AttentionResult(out, lse, nbytes, coverage=alphas.view(B, Hq).clamp_(0.0, 1.0))


def runs_fit(k_seq: torch.Tensor, k_dim: torch.Tensor, v_seq: torch.Tensor) -> bool:
    """Whether the pools can be read as runs: rows of d (sequence-major) and runs of P (dim-major) start at multiples
    of their width in memory, as the store lays them out."""
    P, d = k_seq.shape[2], k_seq.shape[3]
    return all(t.stride(3) == 1 and t.storage_offset() % w == 0 and all(st % w == 0 for st in t.stride()[:3])
               for t, w in ((k_seq, d), (v_seq, d), (k_dim, P)))


def _runs_view(pool: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """The pool's whole storage as [rows, width] and the row its first element starts (every stride but the last
    is a multiple of width in the store's pools)."""
    rows = pool.untyped_storage().nbytes() // (pool.element_size() * width)
    return pool.as_strided((rows, width), (width, 1), 0), pool.storage_offset() // width
