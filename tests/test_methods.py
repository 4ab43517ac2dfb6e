"""Attention methods through the client (dense, sparq, quest), merge_lse, byte counters, and the
client's attend / stats. References are computed on plain contiguous tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvcache import AttentionResult, InProcessClient, InvalidParameter, KVCacheClient
from kvcache.methods import merge_lse

L = 2
LENGTHS = (37, 21, 53)  # odd, different, crossing many page boundaries

TOL = {  # (rtol, atol) for outputs in the store dtype
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _filled(make_client, random_kv, *, G, page_size, lengths=LENGTHS, hkv=2, d=32, dtype=torch.float32, seed=0):
    """A client holding one sequence per length (appended in uneven chunks), a query, and the
    contiguous K/V [S, Hkv, d] of each sequence at layer 1."""
    client = make_client(num_layers=L, num_kv_heads=hkv, head_dim=d, page_size=page_size, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    ids, ks, vs = [], [], []
    for S in lengths:
        sid = client.create().seq_id
        parts_k, parts_v, done = [], [], 0
        while done < S:
            T = min(S - done, int(torch.randint(1, 2 * page_size + 3, (), generator=gen)))
            k, v = random_kv(gen, (L, T, hkv, d), dtype)
            client.append(sid, k, v)
            parts_k.append(k[1])
            parts_v.append(v[1])
            done += T
        ids.append(sid)
        ks.append(torch.cat(parts_k))
        vs.append(torch.cat(parts_v))
    q = torch.randn((len(lengths), hkv * G, d), generator=gen).to(dtype)
    return client, ids, q, ks, vs


def _exact(q, k, v, scale=None):
    """Reference attention of q [Hq, d] over k, v [S, Hkv, d] with SDPA (K/V repeated per GQA group).

    Returns out [Hq, d] f32 and lse [Hq] f32 (torch.logsumexp of the scaled logits).
    """
    Hq, d = q.shape
    G = Hq // k.shape[1]
    K = k.float().transpose(0, 1).repeat_interleave(G, dim=0)  # [Hq, S, d]
    V = v.float().transpose(0, 1).repeat_interleave(G, dim=0)
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = F.scaled_dot_product_attention(q.float()[:, None, :], K, V, scale=scale)[:, 0]
    lse = torch.logsumexp(torch.einsum("hd,hsd->hs", q.float(), K) * scale, dim=-1)
    return out, lse


def _assert_result_close(res, out, lse, dtype=torch.float32, lse_tol=1e-5):
    rtol, atol = TOL[dtype]
    assert res.out.dtype == dtype and res.lse.dtype == torch.float32
    torch.testing.assert_close(res.out.float(), out.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(res.lse, lse, rtol=lse_tol, atol=lse_tol)


# ---- dense -------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("page_size", [4, 16])
def test_dense_equals_sdpa_on_the_gathered_sequences(make_client, random_kv, G, page_size):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=G, page_size=page_size)
    res = client.attend(ids, 1, q)
    assert isinstance(res, AttentionResult)
    assert res.out.shape == q.shape and res.lse.shape == q.shape[:2]
    for b in range(len(ids)):
        out, lse = _exact(q[b], ks[b], vs[b])
        _assert_result_close(AttentionResult(res.out[b], res.lse[b], 0), out, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4])
def test_dense_in_half_precision_matches_sdpa_within_the_dtype_tolerance(make_client, random_kv, dtype, G):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=G, page_size=8, dtype=dtype, seed=1)
    res = client.attend(ids, 1, q)
    for b in range(len(ids)):
        out, lse = _exact(q[b], ks[b], vs[b])
        _assert_result_close(AttentionResult(res.out[b], res.lse[b], 0), out, lse, dtype=dtype, lse_tol=1e-4)


def test_dense_lse_is_the_logsumexp_of_the_scaled_logits(make_client, random_kv):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=4, seed=2)
    res = client.attend(ids, 1, q)
    for b in range(len(ids)):
        K = ks[b].transpose(0, 1).repeat_interleave(2, dim=0)  # [Hq, S, d]
        logits = (q[b][:, None, :] * K).sum(-1) / math.sqrt(q.shape[-1])
        torch.testing.assert_close(res.lse[b], torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)


def test_dense_honours_an_explicit_scale(make_client, random_kv):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=4, seed=3)
    res = client.attend(ids, 1, q, params={"scale": 0.05})
    for b in range(len(ids)):
        out, lse = _exact(q[b], ks[b], vs[b], scale=0.05)
        _assert_result_close(AttentionResult(res.out[b], res.lse[b], 0), out, lse)


def test_dense_of_one_layer_reads_only_that_layer(make_client, random_kv):
    client = make_client(num_layers=2, num_kv_heads=1, head_dim=16, page_size=4)
    gen = torch.Generator().manual_seed(4)
    sid = client.create().seq_id
    k0, v0 = random_kv(gen, (9, 1, 16))
    k1, v1 = random_kv(gen, (5, 1, 16))
    client.append(sid, k0, v0, layer=0)
    client.append(sid, k1, v1, layer=1)
    q = torch.randn((1, 2, 16), generator=gen)
    for layer, (k, v) in enumerate(((k0, v0), (k1, v1))):
        res = client.attend([sid], layer, q)
        out, lse = _exact(q[0], k, v)
        _assert_result_close(AttentionResult(res.out[0], res.lse[0], 0), out, lse)


# ---- sparq -------------------------------------------------------------------------------------


def sparq_transcription(q, K, V, r, k, local_window, reallocate=True):
    """docs/sparse-attention.md §1, line by line, for one sequence on contiguous float32 tensors.

    q [Hq, d]; K, V [S, Hkv, d]. Returns out [Hq, d] and lse [Hq] (lse of the exact stage-2 scores).
    GQA rule (§1): i1 from sum_g |q_g|; i2 from the group's shat; alpha and s per query head.
    """
    Hq, d = q.shape
    S, Hkv, _ = K.shape
    G = Hq // Hkv
    q, K, V = q.float(), K.float(), V.float()
    out = torch.empty(Hq, d)
    lse = torch.empty(Hq)
    for h in range(Hkv):
        Kh, Vh = K[:, h], V[:, h]  # [S, d]
        group = range(h * G, (h + 1) * G)
        vbar = Vh.mean(dim=0)  # vbar[d] = mean_i V[i]
        # 1. i1 = argtopk(|q|, r); for a group, from sum_g |q_g|.
        i1 = torch.topk(sum(q[j].abs() for j in group), r).indices
        shat = {}
        for j in group:
            # 2. tau = sqrt(d * sum|q[i1]| / sum|q|)   (per query head)
            tau = torch.sqrt(d * q[j, i1].abs().sum() / q[j].abs().sum())
            # 3. shat = softmax(q[i1] . K[:, i1]^T / tau) over all S positions
            shat[j] = torch.softmax(Kh[:, i1] @ q[j, i1] / tau, dim=0)
        # 4. m = 1 for the last l = local_window positions, else 0; i2 = argtopk(shat + m, k).
        # For a group §1 says "i2 from sum_g shat_g". The implementation ranks by the group MEAN of
        # shat plus m: the same order as the sum, while mean <= 1 keeps the window guarantee of m = 1.
        # Transcribed that way here.
        m = torch.zeros(S)
        if local_window:
            m[S - local_window :] = 1.0
        i2 = torch.topk(sum(shat[j] for j in group) / G + m, k).indices
        for j in group:
            # 5. alpha = sum(shat[i2])   (alpha = 1 without reallocation)
            alpha = shat[j][i2].sum() if reallocate else torch.tensor(1.0)
            # 6. s = softmax(q . K[i2, :]^T / sqrt(d))
            logits = Kh[i2] @ q[j] / math.sqrt(d)
            s = torch.softmax(logits, dim=0)
            lse[j] = torch.logsumexp(logits, dim=0)
            # 7. y = alpha * (s . V[i2, :]) + (1 - alpha) * vbar
            out[j] = alpha * (s @ Vh[i2]) + (1 - alpha) * vbar
    return out, lse


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("local_window", [0, 5, 21])
def test_sparq_with_all_components_and_all_positions_equals_dense(make_client, random_kv, G, page_size, local_window):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=G, page_size=page_size, lengths=(21, 21), seed=5)
    dense = client.attend(ids, 1, q)
    res = client.attend(ids, 1, q, "sparq", {"r": 32, "k": 21, "local_window": local_window})
    torch.testing.assert_close(res.out, dense.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.lse, dense.lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("reallocate", [True, False])
@pytest.mark.parametrize("r, k, local_window", [(4, 8, 0), (8, 16, 4), (1, 1, 1), (32, 12, 12), (13, 21, 3)])
def test_sparq_matches_a_transcription_of_the_algorithm(
    make_client, random_kv, G, page_size, reallocate, r, k, local_window
):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=G, page_size=page_size, seed=6 + G + page_size)
    params = {"r": r, "k": k, "local_window": local_window, "reallocate": reallocate}
    res = client.attend(ids, 1, q, "sparq", params)
    for b in range(len(ids)):
        out, lse = sparq_transcription(q[b], ks[b], vs[b], r, k, local_window, reallocate)
        _assert_result_close(AttentionResult(res.out[b], res.lse[b], 0), out, lse)


def test_sparq_defaults_to_reallocation_and_no_window(make_client, random_kv):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=4, seed=7)
    res = client.attend(ids, 1, q, "sparq", {"r": 8, "k": 10})
    for b in range(len(ids)):
        out, lse = sparq_transcription(q[b], ks[b], vs[b], 8, 10, 0, True)
        _assert_result_close(AttentionResult(res.out[b], res.lse[b], 0), out, lse)


@pytest.mark.parametrize("G", [1, 2])
def test_sparq_always_attends_to_the_local_window(make_client, random_kv, G):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=G, page_size=4, lengths=(29,), seed=8)
    # Make the last 6 keys point away from every query: the approximate scores alone would never pick them.
    sid = client.create().seq_id
    k_all, v_all = ks[0].clone(), vs[0].clone()
    qdir = q[0].view(2, G, 32).sum(1)  # [Hkv, d]
    k_all[-6:] = -3 * qdir / qdir.norm(dim=-1, keepdim=True) + 0.01 * k_all[-6:]
    kk = torch.stack((k_all, k_all))  # both layers
    vv = torch.stack((v_all, v_all))
    client.append(sid, kk, vv)
    res = client.attend([sid], 1, q, "sparq", {"r": 8, "k": 6, "local_window": 6})
    # Stage 2 then covers exactly the window: its lse is the exact lse over the last 6 rows.
    _, lse_window = _exact(q[0], k_all[-6:], v_all[-6:])
    torch.testing.assert_close(res.lse[0], lse_window, rtol=1e-5, atol=1e-5)
    out, lse = sparq_transcription(q[0], k_all, v_all, 8, 6, 6)
    _assert_result_close(AttentionResult(res.out[0], res.lse[0], 0), out, lse)


def test_sparq_without_reallocation_is_exact_attention_over_the_chosen_rows(make_client, random_kv):
    # With k = S every row is chosen, and alpha = 1 makes the result exact whatever r is.
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=4, lengths=(19, 19), seed=9)
    res = client.attend(ids, 1, q, "sparq", {"r": 2, "k": 19, "reallocate": False})
    dense = client.attend(ids, 1, q)
    torch.testing.assert_close(res.out, dense.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.lse, dense.lse, rtol=1e-5, atol=1e-5)


# ---- quest -------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("page_size", [4, 16])
def test_quest_with_at_least_as_many_pages_as_the_sequence_equals_dense(make_client, random_kv, G, page_size):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=G, page_size=page_size, seed=10)
    dense = client.attend(ids, 1, q)
    n_max = -(-max(LENGTHS) // page_size)
    for top_pages in (n_max, n_max + 5):
        res = client.attend(ids, 1, q, "quest", {"top_pages": top_pages})
        torch.testing.assert_close(res.out, dense.out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.lse, dense.lse, rtol=1e-5, atol=1e-5)


def _quest_case(make_client, G, hkv=2, d=16, P=4, n_pages=7, last_fill=2, seed=11):
    """One sequence whose page j's keys all lie along +c_j times each group's query direction:
    pages 1 and 4 score high, the others medium, and the (partial) last page lowest by far."""
    gen = torch.Generator().manual_seed(seed)
    client = make_client(num_layers=1, num_kv_heads=hkv, head_dim=d, page_size=P)
    u = torch.randn((hkv, d), generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    q = (4 * u[:, None, :] * (1 + 0.1 * torch.arange(G))[None, :, None]).reshape(1, hkv * G, d)
    q = q + 0.05 * torch.randn(q.shape, generator=gen)
    S = (n_pages - 1) * P + last_fill
    c = torch.zeros(n_pages)
    c[[1, 4]] = 3.0
    c[-1] = -3.0
    scale_per_pos = c.repeat_interleave(P)[:S]  # [S]
    k = scale_per_pos[:, None, None] * u[None] + 0.1 * torch.randn((S, hkv, d), generator=gen)
    v = torch.randn((S, hkv, d), generator=gen)
    sid = client.create().seq_id
    client.append(sid, k[None], v[None])
    return client, sid, q, k, v


@pytest.mark.parametrize("G", [1, 2, 4])
def test_quest_always_includes_the_last_page_even_when_it_scores_lowest(make_client, G):
    P = 4
    client, sid, q, k, v = _quest_case(make_client, G, P=P)
    res = client.attend([sid], 0, q, "quest", {"top_pages": 3})
    rows = torch.cat((torch.arange(1 * P, 2 * P), torch.arange(4 * P, 5 * P), torch.arange(6 * P, 6 * P + 2)))
    out, lse = _exact(q[0], k[rows], v[rows])
    _assert_result_close(AttentionResult(res.out[0], res.lse[0], 0), out, lse)
    # Without the last page the lse would be strictly smaller: it really was included.
    _, lse_without_last = _exact(q[0], k[rows[:-2]], v[rows[:-2]])
    assert (res.lse[0] > lse_without_last).all()


@pytest.mark.parametrize("G", [1, 4])
def test_quest_with_one_page_attends_to_the_last_page_only(make_client, G):
    client, sid, q, k, v = _quest_case(make_client, G, P=4, last_fill=3)
    res = client.attend([sid], 0, q, "quest", {"top_pages": 1})
    out, lse = _exact(q[0], k[-3:], v[-3:])
    _assert_result_close(AttentionResult(res.out[0], res.lse[0], 0), out, lse)


def test_quest_picks_the_pages_with_the_highest_bound(make_client):
    P = 4
    client, sid, q, k, v = _quest_case(make_client, 2, P=P, last_fill=P)  # last page full
    G = 2
    res = client.attend([sid], 0, q, "quest", {"top_pages": 2})
    # Each kv head chooses its own pages; the best other than the last is page 1 or page 4 (equal c),
    # and all G query heads of a group read the same choice.
    cands = []
    for page in (1, 4):
        rows = torch.cat((torch.arange(page * P, (page + 1) * P), torch.arange(6 * P, 7 * P)))
        cands.append(_exact(q[0], k[rows], v[rows]))
    for h in range(2):
        heads = slice(h * G, (h + 1) * G)
        assert any(
            torch.allclose(res.lse[0, heads], lse[heads], rtol=1e-5, atol=1e-5)
            and torch.allclose(res.out[0, heads], out[heads], rtol=1e-5, atol=1e-5)
            for out, lse in cands
        ), f"kv head {h}"


# ---- merge_lse ---------------------------------------------------------------------------------


def _client_with_parts(make_client, random_kv, G, cuts, S=41, d=32, seed=12):
    """A sequence of S positions and one sequence per part [cuts[i], cuts[i+1]) of the same rows."""
    client = make_client(num_layers=1, num_kv_heads=2, head_dim=d, page_size=4)
    gen = torch.Generator().manual_seed(seed)
    k, v = random_kv(gen, (1, S, 2, d))
    whole = client.create().seq_id
    client.append(whole, k, v)
    parts = []
    bounds = [0, *cuts, S]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sid = client.create().seq_id
        client.append(sid, k[:, lo:hi], v[:, lo:hi])
        parts.append(sid)
    q = torch.randn((1, 2 * G, d), generator=gen)
    return client, whole, parts, q


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("a", [1, 4, 13, 40])
def test_merge_lse_of_a_split_equals_attention_over_the_whole(make_client, random_kv, G, a):
    client, whole, parts, q = _client_with_parts(make_client, random_kv, G, [a])
    full = client.attend([whole], 0, q)
    halves = [client.attend([p], 0, q) for p in parts]
    out, lse = merge_lse(torch.stack([h.out for h in halves]), torch.stack([h.lse for h in halves]))
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, full.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full.lse, rtol=1e-5, atol=1e-5)


def test_merge_lse_of_a_three_way_split_equals_attention_over_the_whole(make_client, random_kv):
    client, whole, parts, q = _client_with_parts(make_client, random_kv, 2, [7, 30])
    full = client.attend([whole], 0, q)
    res = [client.attend([p], 0, q) for p in parts]
    out, lse = merge_lse(torch.stack([r.out for r in res]), torch.stack([r.lse for r in res]))
    torch.testing.assert_close(out, full.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full.lse, rtol=1e-5, atol=1e-5)


def test_merge_lse_gives_an_empty_part_no_weight(make_client, random_kv):
    client, whole, _, q = _client_with_parts(make_client, random_kv, 2, [])
    full = client.attend([whole], 0, q)
    empty_out = torch.zeros_like(full.out)
    empty_lse = torch.full_like(full.lse, float("-inf"))
    for order in ((0, 1), (1, 0)):
        outs = [full.out, empty_out]
        lses = [full.lse, empty_lse]
        out, lse = merge_lse(torch.stack([outs[i] for i in order]), torch.stack([lses[i] for i in order]))
        torch.testing.assert_close(out, full.out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, full.lse, rtol=1e-6, atol=1e-6)


def test_merge_lse_of_only_empty_parts_is_zero_with_lse_minus_inf():
    outs = torch.zeros((2, 1, 4, 16))
    lses = torch.full((2, 1, 4), float("-inf"))
    out, lse = merge_lse(outs, lses)
    assert torch.equal(out, torch.zeros((1, 4, 16)))
    assert torch.isneginf(lse).all()


def test_merge_lse_keeps_a_half_precision_output_dtype():
    gen = torch.Generator().manual_seed(13)
    outs = torch.randn((2, 3, 16), generator=gen).to(torch.bfloat16)
    lses = torch.randn((2, 3), generator=gen)
    out, lse = merge_lse(outs, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    w = torch.softmax(lses, dim=0)
    torch.testing.assert_close(out.float(), (w[..., None] * outs.float()).sum(0), rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(lse, torch.logsumexp(lses, dim=0))


# ---- bytes read --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_reads_both_k_and_v_of_every_position(make_client, random_kv, dtype):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=8, dtype=dtype, seed=14)
    hkv, d, item = 2, 32, torch.empty((), dtype=dtype).element_size()
    res = client.attend(ids, 1, q)
    assert res.bytes_read == sum(hkv * 2 * S * d * item for S in LENGTHS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r, k", [(4, 8), (32, 21), (1, 1)])
def test_sparq_reads_r_columns_k_rows_and_the_float32_mean(make_client, random_kv, dtype, r, k):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=8, dtype=dtype, seed=15)
    hkv, d, item = 2, 32, torch.empty((), dtype=dtype).element_size()
    res = client.attend(ids, 1, q, "sparq", {"r": r, "k": k})
    assert res.bytes_read == sum(hkv * ((S * r + 2 * k * d) * item + d * 4) for S in LENGTHS)


@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("top_pages", [1, 3, 100])
def test_quest_reads_min_max_summaries_and_the_filled_rows_of_the_chosen_pages(
    make_client, random_kv, page_size, top_pages
):
    client, ids, q, ks, vs = _filled(make_client, random_kv, G=2, page_size=page_size, seed=16)
    hkv, d, item, P = 2, 32, 4, page_size
    res = client.attend(ids, 1, q, "quest", {"top_pages": top_pages})
    expect = 0
    for S in LENGTHS:
        n = -(-S // P)
        t = min(top_pages, n)
        rows = (t - 1) * P + (S - (n - 1) * P)  # the last page (partly filled) is always chosen
        expect += n * hkv * 2 * d * 4 + 2 * hkv * rows * d * item
    assert res.bytes_read == expect


# ---- the client --------------------------------------------------------------------------------


def test_in_process_client_implements_the_client_protocol(make_client):
    assert isinstance(make_client(), KVCacheClient)
    assert isinstance(make_client(), InProcessClient)


@pytest.mark.parametrize("method, params", [("dense", {}), ("sparq", {"r": 8, "k": 6}), ("quest", {"top_pages": 2})])
def test_attend_with_new_kv_appends_first_then_attends(make_client, random_kv, method, params):
    a, ids_a, q, ks, _ = _filled(make_client, random_kv, G=2, page_size=4, seed=17)
    b, ids_b, _, _, _ = _filled(make_client, random_kv, G=2, page_size=4, seed=17)
    gen = torch.Generator().manual_seed(18)
    new_k, new_v = random_kv(gen, (len(ids_a), 2, 32))
    res_a = a.attend(ids_a, 1, q, method, params, new_k=new_k, new_v=new_v)
    for i, sid in enumerate(ids_b):
        b.append(sid, new_k[i : i + 1], new_v[i : i + 1], layer=1)
    res_b = b.attend(ids_b, 1, q, method, params)
    torch.testing.assert_close(res_a.out, res_b.out, rtol=0, atol=0)
    torch.testing.assert_close(res_a.lse, res_b.lse, rtol=0, atol=0)
    assert res_a.bytes_read == res_b.bytes_read
    for sa, sb, S in zip(ids_a, ids_b, LENGTHS):
        assert a.describe(sa).lengths == b.describe(sb).lengths == (S, S + 1)


def test_stats_count_calls_and_bytes_per_method(make_client, random_kv):
    client, ids, q, _, _ = _filled(make_client, random_kv, G=1, page_size=8, seed=19)
    assert client.stats()["methods"] == {}
    results = {
        "dense": [client.attend(ids, 1, q), client.attend(ids[:1], 0, q[:1])],
        "sparq": [client.attend(ids, 1, q, "sparq", {"r": 4, "k": 8})],
        "quest": [client.attend(ids, 0, q, "quest", {"top_pages": 2})],
    }
    stats = client.stats()
    assert stats["pool"] == client.store.pool_usage()
    assert set(stats["methods"]) == set(results)
    for method, res in results.items():
        m = stats["methods"][method]
        assert m["calls"] == len(res)
        assert m["bytes_read"] == sum(r.bytes_read for r in res)
        assert m["seconds"] >= 0


def test_stats_do_not_count_a_failed_call(make_client, random_kv):
    client, ids, q, _, _ = _filled(make_client, random_kv, G=1, page_size=8, seed=20)
    client.attend(ids, 1, q)
    with pytest.raises(InvalidParameter, match="k=10000"):
        client.attend(ids, 1, q, "sparq", {"r": 4, "k": 10_000})
    stats = client.stats()["methods"]
    assert stats["dense"]["calls"] == 1
    assert "sparq" not in stats or stats["sparq"]["calls"] == 0
