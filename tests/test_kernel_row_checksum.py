"""In-kernel row checksums: the attention kernel that reads pinned host rows in place computes each row's checksum as
kvcache.store.tiers.row_checksums does and counts the rows that differ from the stored one; through the store, a byte
flipped in a host-tier page is DATA_LOSS for every method on the Triton path, and a sound host tier reads as
before."""

from __future__ import annotations

import pytest
import torch
from kernel_support import INTERPRETED, TOL

from kvcache import InProcessClient, KVCacheConfig
from kvcache.errors import PageCorrupted
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_DENSE, MODE_ROWS, attend_partial, merge_partials
from kvcache.store.tiers import HOST, row_checksums

pytestmark = pytest.mark.kernel
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def _pools(dtype, N=7, Hkv=2, P=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn((N, 2, Hkv, P, d), generator=g).to(dtype)  # as a host tier's layer: [N, 2, Hkv, P, d]
    return kv.to(DEVICE), row_checksums(kv).to(DEVICE)  # sums [N, 2, Hkv, P]


def _csr(lengths, N, P):
    pages = torch.randperm(N)[: sum(-(-n // P) for n in lengths)].int()
    indptr = torch.tensor([0] + [sum(-(-n // P) for n in lengths[: i + 1]) for i in range(len(lengths))]).int()
    last = torch.tensor([(n - 1) % P + 1 for n in lengths]).int()
    return PageTableCSR(indptr.to(DEVICE), pages.to(DEVICE), last.to(DEVICE), P, list(lengths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [MODE_DENSE, MODE_ROWS])
def test_sound_rows_pass_and_the_output_is_unchanged(dtype, mode):
    kv, sums = _pools(dtype)
    csr = _csr([13, 9], 7, 4)
    q = torch.randn((2, 4, 16)).to(dtype).to(DEVICE)
    items = torch.tensor([[0, 3, 5, 12], [1, 2, 4, 11], [0, 1, 2, 8], [3, 4, 5, 6]], dtype=torch.int32, device=DEVICE)
    args = (q, kv[:, 0], kv[:, 1], csr, 16 if mode == MODE_DENSE else 4, mode)
    extra = {} if mode == MODE_DENSE else {"item_list": items}
    bad = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    checked = attend_partial(*args, **extra, row_sums=(sums[:, 0], sums[:, 1], bad))
    plain = attend_partial(*args, **extra)
    assert int(bad) == 0
    if dtype != torch.bfloat16 or not INTERPRETED:  # the interpreter's bf16 dot is checked on the GPU (kernel_support)
        out_checked, _ = merge_partials(q, checked, 2)
        out_plain, _ = merge_partials(q, plain, 2)
        torch.testing.assert_close(out_checked, out_plain, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_index,byte", [(0, 0), (1, 3), (0, 17)])
def test_one_flipped_byte_is_counted_once_per_read_of_its_row(dtype, kv_index, byte):
    kv, sums = _pools(dtype)
    csr = _csr([13], 7, 4)
    page = int(csr.indices[1])  # positions 4..7
    kv[page, kv_index, 1, 2].view(torch.uint8)[byte] ^= 0x08  # head 1, row 2: position 6
    q = torch.randn((1, 4, 16)).to(dtype).to(DEVICE)
    bad = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    attend_partial(q, kv[:, 0], kv[:, 1], csr, 13, MODE_DENSE, row_sums=(sums[:, 0], sums[:, 1], bad))
    assert int(bad) == 1
    bad.zero_()
    rows = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.int32, device=DEVICE)  # position 6 not among them
    attend_partial(q, kv[:, 0], kv[:, 1], csr, 4, MODE_ROWS, item_list=rows, row_sums=(sums[:, 0], sums[:, 1], bad))
    assert int(bad) == 0  # a sparse read of sound rows of the same page passes: checks are per row


@pytest.mark.parametrize("method,params", [("dense", {}), ("quest", {"top_pages": 10}), ("sparq", {"r": 4, "k": 40}),
                                           ("window", {"window": 40})])
def test_through_the_store_a_corrupted_host_page_is_data_loss_on_the_triton_path(method, params):
    config = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4, dtype=torch.float32,
                           device=DEVICE, device_pages=4, host_pages=16, pinned_tail_pages=1)
    client = InProcessClient(config)
    sid = client.create().seq_id
    client.append(sid, torch.randn((2, 40, 2, 16)), torch.randn((2, 40, 2, 16)))
    other = client.create().seq_id
    client.append(other, torch.randn((2, 6, 2, 16)), torch.randn((2, 6, 2, 16)))
    tiers = client.store.tiers
    q = torch.randn((1, 4, 16))
    want = client.attend([sid], 0, q, method, params, backend="torch").out
    torch.testing.assert_close(client.attend([sid], 0, q, method, params, backend="triton").out, want,
                               rtol=1e-4, atol=1e-4)  # a sound host tier reads as before
    pages = client.store.page_table([sid], 0).indices.tolist()
    host = [p for p in pages if int(tiers.tier[p]) == HOST]
    assert host, "the test needs pages of the sequence on the host tier"
    target = host[0]
    tiers.storage[HOST].data[0, int(tiers.slot[target]), 1, 0, 1].view(torch.uint8)[2] ^= 0x20
    with pytest.raises(PageCorrupted, match=f"page {target} of sequence {sid} on the host tier"):
        client.attend([sid], 0, q, method, params, backend="triton")
    assert target in tiers.quarantined and len(tiers.quarantined) == 1
    client.attend([other], 0, q, method, {**params, **({"k": 6} if method == "sparq" else {})}, backend="triton")
