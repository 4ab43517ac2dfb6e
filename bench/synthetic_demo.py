"""The demo: a store filled with synthetic K/V of Llama-3-8B's attention shape; bytes and error per method."""

from __future__ import annotations

import torch

from kvcache.clients.inprocess import InProcessClient
from kvcache.config import KVCacheConfig


def synthetic_kv(
    seq_len: int, num_kv_heads: int, head_dim: int, num_q_heads: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V [S, Hkv, d] and one decode query q [Hq, d] with the structure real attention has.

    Keys have a few high-magnitude channels (as LLM keys do) and topic runs of 64 positions; each query head looks for a
    handful of planted positions, so attention is concentrated the way sparse methods assume.
    """
    g = generator
    channel_scale = torch.ones(head_dim)
    channel_scale[torch.randperm(head_dim, generator=g)[: head_dim // 16]] = 4.0
    # Nearby positions share a slowly changing component (text stays on a topic for a while),
    # which is what lets page summaries tell pages apart.
    topics = torch.randn(-(-seq_len // 64), num_kv_heads, head_dim, generator=g)
    k = (topics.repeat_interleave(64, dim=0)[:seq_len] + torch.randn(seq_len, num_kv_heads, head_dim, generator=g))
    k = k * channel_scale
    v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
    group = num_q_heads // num_kv_heads
    q = torch.empty(num_q_heads, head_dim)
    for h in range(num_q_heads):
        targets = torch.randint(0, seq_len, (8,), generator=g)
        direction = k[targets, h // group].sum(0)
        direction = direction / direction.norm()
        # Scaled so the planted positions' logits q.k/sqrt(d) average 10: a peaked head.
        per_unit = (k[targets, h // group] @ direction).mean() / head_dim**0.5
        q[h] = direction * 10.0 / per_unit + 0.1 * torch.randn(head_dim, generator=g)
    return k, v, q


def run_demo(seq_len: int = 4096, dtype: str = "bfloat16", page_size: int = 16, seed: int = 0) -> list[dict]:
    """Fill a store, run each method on one decode step, print and return a row per method."""
    num_q_heads, num_kv_heads, head_dim = 32, 8, 128
    config = KVCacheConfig(
        num_layers=1,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        device_pages=-(-seq_len // page_size) + 8,
    )
    client = InProcessClient(config)
    gen = torch.Generator().manual_seed(seed)
    k, v, q = synthetic_kv(seq_len, num_kv_heads, head_dim, num_q_heads, gen)
    seq = client.create().seq_id
    client.append(seq, k.to(config.dtype), v.to(config.dtype), layer=0)
    q = q[None].to(config.dtype)

    d, S = head_dim, seq_len
    runs = [
        ("dense", {}),
        ("sparq", {"r": d // 4, "k": S // 8, "local_window": S // 32}),
        ("sparq", {"r": d // 8, "k": S // 16, "local_window": S // 64}),
        ("sparq", {"r": d // 8, "k": S // 16, "local_window": S // 64, "reallocate": False}),
        ("quest", {"top_pages": S // 8 // page_size}),
        ("quest", {"top_pages": S // 16 // page_size}),
    ]
    dense_result = client.attend([seq], 0, q, "dense")
    ref = dense_result.out.float()
    rows = []
    for method, params in runs:
        res = client.attend([seq], 0, q, method, params)
        err = ((res.out.float() - ref).norm() / ref.norm()).item()
        rows.append(
            {
                "method": method,
                "params": params,
                "bytes_per_step": res.bytes_read,
                "fraction_of_dense": res.bytes_read / dense_result.bytes_read,
                "rel_error": err,
            }
        )
    print(f"kvcache demo: S={S}, 32 q heads, 8 kv heads, d=128, {dtype}, page {page_size}, one layer, one decode step")
    print(f"{'method':<8} {'params':<48} {'bytes/step':>12} {'of dense':>9} {'rel err':>9}")
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        print(
            f"{row['method']:<8} {params:<48} {row['bytes_per_step']:>12,} "
            f"{row['fraction_of_dense']:>8.3f}x {row['rel_error']:>9.4f}"
        )
    return rows
