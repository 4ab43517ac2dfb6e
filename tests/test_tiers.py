"""Offload tiers (device -> host -> disk): every position reads back exactly wherever its page went,
attention over a tiered store equals attention over a plain one (torch and Triton paths), checksums
catch pages changed off the device, full tiers raise StoreFull without changing anything, and the
stats count pages per tier and bytes per direction.

Everything runs on the CPU with tiny shapes (2 layers, 2 kv heads, d = 16, pages of 4, float32); the
Triton path runs under the interpreter. The disk tier's file goes to pytest's tmp_path.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvcache import InProcessClient, KVCacheConfig, StoreFull
from kvcache.errors import PageCorrupted
from kvcache.methods import attend as attend_module
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate
from kvcache.store.tiers import DEVICE, DISK, HOST

L, HKV, D, P = 2, 2, 16, 4
DTYPE = torch.float32
ITEMSIZE = 4
KV_PAGE_BYTES = L * 2 * HKV * P * D * ITEMSIZE  # K and V of one page, all layers: what a page move carries
TIER_KEYS = {DEVICE: "device", HOST: "host", DISK: "disk"}


# ---- construction and a contiguous reference of what was appended ---------------------------------


def make_client(tmp_path, device_pages, host_pages=0, disk_pages=0, pinned_tail_pages=2) -> InProcessClient:
    config = KVCacheConfig(
        num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=P, dtype=DTYPE, device="cpu",
        device_pages=device_pages, host_pages=host_pages, disk_pages=disk_pages,
        disk_path=str(tmp_path), pinned_tail_pages=pinned_tail_pages,
    )
    return InProcessClient(config)


class Reference:
    """What was appended to each sequence: per layer, k and v [S, Hkv, d]."""

    def __init__(self) -> None:
        self.k: dict[str, list[torch.Tensor]] = {}
        self.v: dict[str, list[torch.Tensor]] = {}

    def add(self, sid: str) -> None:
        empty = torch.empty((0, HKV, D), dtype=DTYPE)
        self.k[sid] = [empty] * L
        self.v[sid] = [empty] * L

    def append(self, sid: str, k: torch.Tensor, v: torch.Tensor, layer: int | None = None) -> None:
        layers = range(L) if layer is None else [layer]
        if layer is not None:
            k, v = k[None], v[None]
        for i, lay in enumerate(layers):
            self.k[sid][lay] = torch.cat((self.k[sid][lay], k[i]))
            self.v[sid][lay] = torch.cat((self.v[sid][lay], v[i]))

    def fork(self, parent: str, child: str) -> None:
        self.k[child] = [t.clone() for t in self.k[parent]]
        self.v[child] = [t.clone() for t in self.v[parent]]

    def drop(self, sid: str) -> None:
        del self.k[sid], self.v[sid]

    def length(self, sid: str, layer: int = 0) -> int:
        return self.k[sid][layer].shape[0]


def new_seq(c: InProcessClient, ref: Reference) -> str:
    sid = c.create().seq_id
    ref.add(sid)
    return sid


def fork_seq(c: InProcessClient, ref: Reference, parent: str) -> str:
    child = c.fork(parent).seq_id
    ref.fork(parent, child)
    return child


def random_kv(gen: torch.Generator, shape):
    return torch.randn(shape, generator=gen).to(DTYPE), torch.randn(shape, generator=gen).to(DTYPE)


def append(c, ref, sid, gen, T, layer=None):
    """Append T random positions (all layers at once, or one layer) to the store and the reference."""
    shape = (L, T, HKV, D) if layer is None else (T, HKV, D)
    k, v = random_kv(gen, shape)
    c.append(sid, k, v, layer=layer)
    ref.append(sid, k, v, layer=layer)


def append_rows_per_layer(c, ref, sid, gen, rng, T=1):
    """T positions written one layer at a time, layers in a random order (a decode step's pattern for T = 1)."""
    layers = list(range(L))
    rng.shuffle(layers)
    for layer in layers:
        append(c, ref, sid, gen, T, layer=layer)


# ---- reading back and checking the tier bookkeeping ------------------------------------------------


def assert_reads_back(c: InProcessClient, ref: Reference, sids=None, seed: int = 0) -> None:
    """Every position of every sequence, every layer, read with fetch 'rows' (each kv head in its own
    random order), equals what was appended, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    for sid in ref.k if sids is None else sids:
        info = c.describe(sid)
        assert info.lengths == tuple(ref.length(sid, lay) for lay in range(L)), f"{sid}: lengths"
        for layer in range(L):
            S = ref.length(sid, layer)
            if S == 0:
                continue
            positions = torch.stack([torch.randperm(S, generator=gen) for _ in range(HKV)])  # [Hkv, S]
            keys, values = c.fetch(sid, layer, "rows", positions).tensors
            heads = torch.arange(HKV)[:, None]
            want_k = ref.k[sid][layer][positions, heads]  # [Hkv, S, d]
            want_v = ref.v[sid][layer][positions, heads]
            assert keys.shape == (HKV, S, D) and values.shape == (HKV, S, D)
            assert torch.equal(keys, want_k), f"{sid} layer {layer}: keys differ"
            assert torch.equal(values, want_v), f"{sid} layer {layer}: values differ"


def live_pages(c: InProcessClient, sid: str) -> list[int]:
    """Page ids of a sequence in position order (over its longest layer)."""
    best: list[int] = []
    for layer in range(L):
        pages = c.store.page_table([sid], layer).pages_of(0).tolist()
        if len(pages) > len(best):
            best = pages
    return best


def tier_of(c: InProcessClient, page: int) -> int:
    return int(c.store.tiers.tier[page])


def tier_counts(c: InProcessClient) -> dict[int, int]:
    pool = c.stats()["pool"]
    return {t: pool[f"pages_{name}"] for t, name in TIER_KEYS.items()}


def check_tiers(c: InProcessClient, sids) -> None:
    """Bookkeeping of a tiered store without a prefix cache:
    - every live page sits in exactly one tier, at a slot no other page uses;
    - per tier, pages + free slots == capacity; the stats' page counts equal the live pages per tier;
    - the allocator's free pages + live pages == all pages (nothing leaked);
    - the last `pinned_tail_pages` pages of every live sequence are on the device."""
    cfg = c.config
    tiers = c.store.tiers
    pages = set()
    for sid in sids:
        pages.update(live_pages(c, sid))
    per_tier = {DEVICE: set(), HOST: set(), DISK: set()}
    for p in pages:
        t = tier_of(c, p)
        assert t in per_tier, f"live page {p} is in no tier ({t})"
        slot = int(tiers.slot[p])
        assert slot not in per_tier[t], f"page {p}: slot {slot} of tier {t} used twice"
        per_tier[t].add(slot)
    pool = c.stats()["pool"]
    cap = {DEVICE: cfg.device_pages, HOST: cfg.host_pages, DISK: cfg.disk_pages}
    for t, name in TIER_KEYS.items():
        assert pool[f"pages_{name}"] == len(per_tier[t]), f"pages_{name}: {pool} vs {len(per_tier[t])} live"
        assert pool[f"pages_{name}"] + pool.get(f"free_{name}", 0) == cap[t], f"{name} slots: {pool}"
    assert pool["pages_free"] + len(pages) == pool["pages_total"] == cfg.total_pages, f"leaked page ids: {pool}"
    w = cfg.pinned_tail_pages
    for sid in sids:
        tail = live_pages(c, sid)[-w:]
        assert all(tier_of(c, p) == DEVICE for p in tail), f"{sid}: pinned tail {tail} not all on the device"


def flip_byte(c: InProcessClient, page: int) -> tuple[torch.Tensor, int]:
    """Flip one bit of the first K element (layer 0, head 0, row 0) of a page off the device, in place."""
    tier = tier_of(c, page)
    assert tier in (HOST, DISK)
    data = c.store.tiers.storage[tier].data  # [L, N, 2, Hkv, P, d]
    raw = data[0, int(c.store.tiers.slot[page])].view(torch.uint8).view(-1)
    raw[1] ^= 0x10
    return raw, 1


# ---- 1. every position reads back wherever its page went --------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_every_position_reads_back_across_three_tiers(tmp_path, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    c = make_client(tmp_path, device_pages=8, host_pages=10, disk_pages=40)  # 58 pages, 8 on the device
    ref = Reference()

    def grow(sid, big=False):
        """One random append: all layers in a chunk (sometimes larger than the device's free room),
        or one position (or a few) per layer, layers in random order."""
        kind = rng.random()
        if kind < 0.3:
            append_rows_per_layer(c, ref, sid, gen, rng, T=1)
        elif kind < 0.4:
            append_rows_per_layer(c, ref, sid, gen, rng, T=rng.randint(2, 6))
        else:
            append(c, ref, sid, gen, rng.randint(13, 26) if big else rng.randint(1, 3 * P))

    def prefetch_random(sids, n):
        for _ in range(n):
            sid = rng.choice(sids)
            npages = c.describe(sid).num_pages
            idx = rng.sample(range(npages), k=min(npages, rng.randint(1, 2)))
            c.prefetch(sid, idx)
            wanted = [live_pages(c, sid)[i] for i in idx]
            assert all(tier_of(c, p) == DEVICE for p in wanted), "prefetched pages are not on the device"
            check_tiers(c, sids)

    # Phase 1: two sequences, interleaved appends in random sizes, until pages fill all three tiers.
    a, b = new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 30)  # larger than the device alone: written a chunk at a time
    order = [a, b] * 10
    rng.shuffle(order)
    for i, sid in enumerate(order):
        grow(sid, big=(i % 7 == 3))
        check_tiers(c, [a, b])
        if ref.length(a) + ref.length(b) > 90:
            break
    counts = tier_counts(c)
    assert counts[DEVICE] > 0 and counts[HOST] > 0 and counts[DISK] > 0, f"not spread over 3 tiers: {counts}"
    assert_reads_back(c, ref, seed=seed)

    # Phase 2: prefetch random pages (other pages move down), with appends in between.
    prefetch_random([a, b], 4)
    assert_reads_back(c, ref, seed=seed + 1)
    for sid in rng.sample([a, b], 2):
        grow(sid)
    prefetch_random([a, b], 3)
    assert_reads_back(c, ref, seed=seed + 2)
    check_tiers(c, [a, b])

    # Phase 3: fork a (its last page partly filled: copy on write), then parent and child diverge.
    if ref.length(a) % P == 0:
        append(c, ref, a, gen, 1)
    partial = ref.length(a) // P  # index of a's partly filled last page
    a2 = fork_seq(c, ref, a)
    check_tiers(c, [a, b, a2])
    assert_reads_back(c, ref, seed=seed + 3)
    shared = set(live_pages(c, a)) & set(live_pages(c, a2))
    assert shared, "a fork shares its parent's pages"
    for sid in rng.sample([a, a2], 2):
        grow(sid)
    # The shared partial page was copied on write by whichever wrote first: the tables differ from there on.
    assert live_pages(c, a)[:partial] == live_pages(c, a2)[:partial]
    assert live_pages(c, a)[partial] != live_pages(c, a2)[partial]
    assert_reads_back(c, ref, seed=seed + 4)
    for sid in [a2, a, a2, b]:
        grow(sid, big=rng.random() < 0.5)
        check_tiers(c, [a, b, a2])
    assert_reads_back(c, ref, seed=seed + 5)
    shared = set(live_pages(c, a)) & set(live_pages(c, a2))
    assert any(tier_of(c, p) != DEVICE for p in shared), "no shared page went below the device"
    assert_reads_back(c, ref, [a, a2], seed=seed + 6)
    prefetch_random([a, b, a2], 3)
    assert_reads_back(c, ref, seed=seed + 7)

    # Phase 4: free b; the others are intact, its pages return to every tier's free slots.
    before = tier_counts(c)
    c.free(b)
    ref.drop(b)
    after = tier_counts(c)
    assert sum(after.values()) < sum(before.values())
    check_tiers(c, [a, a2])
    assert_reads_back(c, ref, seed=seed + 8)
    # ... and the freed slots are reused.
    order = [a, a2] * 4
    rng.shuffle(order)
    for sid in order:
        grow(sid)
        check_tiers(c, [a, a2])
    prefetch_random([a, a2], 3)
    assert_reads_back(c, ref, seed=seed + 9)
    counts = tier_counts(c)
    assert counts[DEVICE] > 0 and counts[HOST] > 0 and counts[DISK] > 0, f"not spread over 3 tiers: {counts}"


@pytest.mark.parametrize("host_pages, disk_pages", [(12, 0), (0, 12)], ids=["host-only", "disk-only"])
def test_reads_back_with_one_lower_tier(tmp_path, host_pages, disk_pages):
    """device -> host only, or device -> disk directly when there is no host tier."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    c = make_client(tmp_path, device_pages=6, host_pages=host_pages, disk_pages=disk_pages)
    ref = Reference()
    a, b = new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 21)
    for _ in range(5):
        append_rows_per_layer(c, ref, b, gen, rng)
    append(c, ref, b, gen, 11)
    check_tiers(c, [a, b])
    lower = HOST if host_pages else DISK
    assert tier_counts(c)[lower] > 0
    assert_reads_back(c, ref)
    c.prefetch(a, [0, 1])
    check_tiers(c, [a, b])
    assert_reads_back(c, ref)
    key = f"{TIER_KEYS[lower]}<-device"
    assert set(c.stats()["bytes_moved"]) <= {key, f"device<-{TIER_KEYS[lower]}"}


def test_lru_order_of_eviction(tmp_path):
    """The least recently used unpinned page goes down first; a prefetch makes a page recent."""
    gen = torch.Generator().manual_seed(4)
    c = make_client(tmp_path, device_pages=4, host_pages=20, pinned_tail_pages=1)
    ref = Reference()
    a = new_seq(c, ref)
    append(c, ref, a, gen, 4 * P)  # pages 0..3 on the device
    pages = live_pages(c, a)
    assert [tier_of(c, p) for p in pages] == [DEVICE] * 4
    append(c, ref, a, gen, 1)  # a 5th page: the oldest (page 0) goes down
    assert [tier_of(c, p) for p in pages] == [HOST, DEVICE, DEVICE, DEVICE]
    c.prefetch(a, [0])  # page 0 back; page 1 is now the least recently used
    assert [tier_of(c, p) for p in pages] == [DEVICE, HOST, DEVICE, DEVICE]
    append(c, ref, a, gen, P)  # a 6th page: page 2 goes down
    assert [tier_of(c, p) for p in pages] == [DEVICE, HOST, HOST, DEVICE]
    assert_reads_back(c, ref)
    check_tiers(c, [a])


def test_append_after_fork_larger_than_the_device(tmp_path):
    """A parent forked and then appended with more positions than the device holds: the chunked write
    must account for the child's pinned tail (the parent's old pages); the store has room below."""
    gen = torch.Generator().manual_seed(5)
    c = make_client(tmp_path, device_pages=6, host_pages=10, disk_pages=30)
    ref = Reference()
    a = new_seq(c, ref)
    append(c, ref, a, gen, 10)  # 3 pages, the last partly filled
    child = fork_seq(c, ref, a)
    append(c, ref, a, gen, 40)  # 10 more pages: 1 copied on write + 9 new, in chunks
    append(c, ref, child, gen, 7)
    check_tiers(c, [a, child])
    assert_reads_back(c, ref)


# ---- 2. attention over a tiered store equals attention over a plain one ------------------------------

LENGTHS = (45, 27)  # 12 and 7 pages, both last pages partly filled; both >= k = 24
METHODS = [
    ("dense", {}),
    ("sparq", {"r": 8, "k": 24, "local_window": 4}),
    ("quest", {"top_pages": 6}),
    ("oracle", {"budget": 20}),
    ("gate", {"budget": 20}),  # with GQA only: the gate is made for groups of 2
]
TIERINGS = {
    "host+disk": {"host_pages": 6, "disk_pages": 30},
    "host-only": {"host_pages": 30},
    "disk-only": {"disk_pages": 30},
}


def _fill_pair(tmp_path, tiering):
    """The same K/V appended to a plain store and a tiered one (device of 6 pages); sequence ids of both."""
    plain = make_client(tmp_path, device_pages=64)
    tiered = make_client(tmp_path, device_pages=6, **TIERINGS[tiering])
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    ids = {id(plain): [], id(tiered): []}
    for cl in (plain, tiered):
        ids[id(cl)] = [cl.create().seq_id for _ in LENGTHS]
    remaining = list(LENGTHS)
    while any(remaining):
        for b in range(len(LENGTHS)):
            T = min(remaining[b], rng.randint(1, 9))
            if T == 0:
                continue
            remaining[b] -= T
            k, v = random_kv(gen, (L, T, HKV, D))
            for cl in (plain, tiered):
                cl.append(ids[id(cl)][b], k, v)
    return plain, ids[id(plain)], tiered, ids[id(tiered)]


def _offloaded_pages(c, sids):
    """Pages of the batch per lower tier."""
    out = {HOST: 0, DISK: 0}
    for sid in sids:
        for p in live_pages(c, sid):
            t = tier_of(c, p)
            if t in out:
                out[t] += 1
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tiering", list(TIERINGS))
def test_attention_equals_plain_store(tmp_path, monkeypatch, tiering, backend):
    plain, plain_ids, tiered, tiered_ids = _fill_pair(tmp_path, tiering)
    offloaded = _offloaded_pages(tiered, tiered_ids)
    expect_tiers = {"host+disk": (HOST, DISK), "host-only": (HOST,), "disk-only": (DISK,)}[tiering]
    for t in (HOST, DISK):
        assert (offloaded[t] > 0) == (t in expect_tiers), f"pages per lower tier: {offloaded}"
    tiers_before = tiered.store.tiers.tier.clone()

    gate = PageGate(GateShape(L, HKV, 2, D, P), seed=3)
    for c in (plain, tiered):
        attach_gate(c.store, gate)

    # Which path served the tiered store's calls: the Triton path must read host pages in place (no torch
    # fallback), and leave a batch with pages on disk to the torch path.
    calls = {"torch": 0, "triton": 0}
    for name in ("attend_torch", "attend_triton"):
        real = getattr(attend_module, name)
        short = name.removeprefix("attend_")

        def spy(q, inputs, *a, _real=real, _name=short, **kw):
            calls[_name] += inputs.store is tiered.store
            return _real(q, inputs, *a, **kw)

        monkeypatch.setattr(attend_module, name, spy)

    gen = torch.Generator().manual_seed(11)
    moved = {}
    for G in (1, 2):  # Hq = Hkv and GQA with Hq = 2 * Hkv
        for layer in range(L):
            q = torch.randn((len(LENGTHS), HKV * G, D), generator=gen).to(DTYPE)
            for method, params in METHODS:
                if backend == "triton" and G == 1 and layer == 1:
                    continue  # the interpreter is slow: one layer is enough for G = 1
                if method == "gate" and G != 2:
                    continue
                want = plain.attend(plain_ids, layer, q, method, params, backend=backend)
                got = tiered.attend(tiered_ids, layer, q, method, params, backend=backend)
                what = f"{tiering} {backend} G={G} layer {layer} {method}"
                assert got.out.shape == want.out.shape and not got.out.isnan().any(), what
                torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-5, msg=what)
                torch.testing.assert_close(got.lse, want.lse, rtol=1e-5, atol=1e-5, msg=what)
                assert got.bytes_read == want.bytes_read, what
                torch.testing.assert_close(got.coverage, want.coverage, rtol=1e-5, atol=1e-6, msg=what)
                assert not want.bytes_moved, f"{what}: a plain store moves nothing"
                moved[method, G, layer] = got.bytes_moved
    # Attention reads pages where they are: none moved between tiers.
    assert torch.equal(tiered.store.tiers.tier, tiers_before)

    if backend == "torch":
        assert calls == {"torch": sum(1 for _ in moved), "triton": 0}
    elif tiering == "host-only":
        assert calls["torch"] == 0 and calls["triton"] == len(moved), calls
    else:
        assert calls["triton"] == 0 and calls["torch"] == len(moved), calls

    # Dense streams every offloaded page (K and V, all kv heads) of the layer, from each lower tier.
    per_page = 2 * HKV * P * D * ITEMSIZE
    for (method, G, layer), m in moved.items():
        if method != "dense":
            continue
        want = {f"device<-{TIER_KEYS[t]}": offloaded[t] * per_page for t in expect_tiers}
        assert m == want, f"dense G={G} layer {layer}: moved {m}, expected {want}"
        sparq_moved = sum(moved["sparq", G, layer].values())
        quest_moved = sum(moved["quest", G, layer].values())
        assert 0 < sparq_moved < sum(m.values()), (moved["sparq", G, layer], m)
        assert 0 < quest_moved <= sum(m.values()), (moved["quest", G, layer], m)
        # SparQ moves at most its k rows (K and V) per sequence and kv head.
        assert sparq_moved <= len(LENGTHS) * HKV * 24 * 2 * D * ITEMSIZE


# ---- 3. checksums catch pages changed off the device -------------------------------------------------


def _store_with_pages_below(tmp_path):
    """a: 10 pages over device, host and disk; b: 2 pages. Device 4, host 4, disk 12, pinned tail 1."""
    gen = torch.Generator().manual_seed(13)
    c = make_client(tmp_path, device_pages=4, host_pages=4, disk_pages=12, pinned_tail_pages=1)
    ref = Reference()
    a, b = new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 10 * P - 1)
    append(c, ref, b, gen, 2 * P)
    counts = tier_counts(c)
    assert counts[HOST] > 0 and counts[DISK] > 0, counts
    return c, ref, a, b


@pytest.mark.parametrize("tier", [HOST, DISK], ids=["host", "disk"])
def test_prefetch_of_a_corrupted_page_raises(tmp_path, tier):
    c, ref, a, b = _store_with_pages_below(tmp_path)
    pages = live_pages(c, a)
    idx = next(i for i, p in enumerate(pages) if tier_of(c, p) == tier)
    raw, at = flip_byte(c, pages[idx])
    with pytest.raises(PageCorrupted, match=a) as info:
        c.prefetch(a, [idx])
    assert "page" in str(info.value)
    assert tier_of(c, pages[idx]) == tier, "a corrupted page must not be brought up"
    with pytest.raises(PageCorrupted, match=a):  # a prefetch of all pages checks every page first
        c.prefetch(a)
    assert tier_of(c, pages[idx]) == tier
    check_tiers(c, [a, b])
    assert_reads_back(c, ref, [b])
    # Restored, the page passes its check and comes up with its original bytes.
    raw[at] ^= 0x10
    c.prefetch(a, [idx])
    assert tier_of(c, pages[idx]) == DEVICE
    check_tiers(c, [a, b])
    assert_reads_back(c, ref)


@pytest.mark.parametrize("tier", [HOST, DISK], ids=["host", "disk"])
def test_write_to_a_corrupted_page_raises(tmp_path, tier):
    """A layer behind the others appends into a page that went down; the page is checked when it comes back."""
    gen = torch.Generator().manual_seed(17)
    c = make_client(tmp_path, device_pages=4, host_pages=4, disk_pages=12, pinned_tail_pages=1)
    ref = Reference()
    a = new_seq(c, ref)
    append(c, ref, a, gen, 1)  # page 0 holds one row in each layer
    append(c, ref, a, gen, 5 * P, layer=0)  # layer 0 runs ahead: 6 pages, page 0 goes to the host
    if tier == DISK:
        append(c, ref, a, gen, 4 * P, layer=0)  # 10 pages: the host is full, page 0 goes on to disk
    page0 = live_pages(c, a)[0]
    assert tier_of(c, page0) == tier
    flip_byte(c, page0)
    with pytest.raises(PageCorrupted, match=a):
        append(c, ref, a, gen, 1, layer=1)  # position 1 of layer 1: into page 0
    assert c.describe(a).lengths[1] == 1
    assert tier_of(c, page0) == tier


def test_corruption_found_while_moving_host_to_disk(tmp_path):
    """A corrupted host page is caught when it is moved to disk; the pages moved with it, and every
    other sequence, stay intact and the bookkeeping stays consistent."""
    gen = torch.Generator().manual_seed(19)
    c = make_client(tmp_path, device_pages=4, host_pages=4, disk_pages=12, pinned_tail_pages=1)
    ref = Reference()
    a, x = new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 2 * P)  # a's pages go down first (least recently used) ...
    append(c, ref, x, gen, 6 * P)  # ... then x's
    host_pages = [p for p in live_pages(c, a) + live_pages(c, x) if tier_of(c, p) == HOST]
    assert len(host_pages) == 4 and tier_counts(c)[HOST] == 4
    bad = next(p for p in live_pages(c, x) if tier_of(c, p) == HOST)  # not first in line to go to disk
    flip_byte(c, bad)
    check_tiers(c, [a, x])
    with pytest.raises(PageCorrupted, match=x):
        append(c, ref, x, gen, 3 * P)  # host full: its oldest pages must go to disk, `bad` among them
    check_tiers(c, [a, x])
    assert_reads_back(c, ref, [a])
    c.free(x)
    ref.drop(x)
    b = new_seq(c, ref)
    append(c, ref, b, gen, 6 * P)  # reuses the freed slots
    check_tiers(c, [a, b])
    assert_reads_back(c, ref)


# ---- 4. full tiers -----------------------------------------------------------------------------------------


def _pool_and_tables(c, sids):
    return c.stats()["pool"], {s: (c.describe(s), live_pages(c, s)) for s in sids}


def test_store_full_when_every_tier_is_full(tmp_path):
    rng = random.Random(23)
    gen = torch.Generator().manual_seed(23)
    c = make_client(tmp_path, device_pages=4, host_pages=4, disk_pages=4, pinned_tail_pages=1)  # 12 pages
    ref = Reference()
    a, b, f = new_seq(c, ref), new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 7 * P)
    append(c, ref, b, gen, 3 * P - 2)
    append(c, ref, f, gen, P)  # 11 pages
    counts = tier_counts(c)
    assert counts == {DEVICE: 4, HOST: 4, DISK: 3}, counts

    before = _pool_and_tables(c, [a, b, f])
    with pytest.raises(StoreFull):
        append(c, ref, f, gen, 2 * P)  # needs 2 pages, 1 is free
    assert _pool_and_tables(c, [a, b, f]) == before
    assert c.describe(f).lengths == (P, P)
    ref.k[f], ref.v[f] = [t[:P] for t in ref.k[f]], [t[:P] for t in ref.v[f]]
    assert_reads_back(c, ref)

    append(c, ref, f, gen, P)  # the last free page: every tier is full now
    assert c.stats()["pool"]["pages_free"] == 0
    for attempt in ("all layers", "per layer"):
        before = _pool_and_tables(c, [a, b, f])
        with pytest.raises(StoreFull):
            if attempt == "all layers":
                c.append(f, *random_kv(gen, (L, 1, HKV, D)))
            else:
                c.append(f, *random_kv(gen, (1, HKV, D)), layer=rng.randrange(L))
        assert _pool_and_tables(c, [a, b, f]) == before, attempt
    # b's last page has room: b can still grow into it (and f can not).
    append(c, ref, b, gen, 2)
    check_tiers(c, [a, b, f])
    assert_reads_back(c, ref)
    # Freeing makes room again.
    c.free(a)
    ref.drop(a)
    append(c, ref, f, gen, 5 * P)
    check_tiers(c, [b, f])
    assert_reads_back(c, ref)


def test_store_full_when_the_device_cannot_hold_the_pinned_tails(tmp_path):
    gen = torch.Generator().manual_seed(29)
    c = make_client(tmp_path, device_pages=4, host_pages=20, disk_pages=20, pinned_tail_pages=2)
    ref = Reference()
    a, b = new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 3 * P)
    rng = random.Random(29)
    for _ in range(2 * P):  # decode-style, one row per layer: a's and b's tails pin all 4 device pages
        append_rows_per_layer(c, ref, b, gen, rng)
    assert tier_counts(c)[DEVICE] == 4
    s = new_seq(c, ref)
    for shape, layer in (((L, 5, HKV, D), None), ((L, 1, HKV, D), None), ((1, HKV, D), 0)):
        before = _pool_and_tables(c, [a, b, s])
        with pytest.raises(StoreFull, match="device"):
            c.append(s, *random_kv(gen, shape), layer=layer)
        assert _pool_and_tables(c, [a, b, s]) == before
        assert c.describe(s).lengths == (0, 0)
    check_tiers(c, [a, b, s])
    assert_reads_back(c, ref)
    # Once b is gone, s has room.
    c.free(b)
    ref.drop(b)
    for _ in range(3):
        append_rows_per_layer(c, ref, s, gen, rng)
    check_tiers(c, [a, s])
    assert_reads_back(c, ref)


# ---- 5. stats ------------------------------------------------------------------------------------------------


def test_stats_count_pages_per_tier_and_bytes_per_direction(tmp_path):
    gen = torch.Generator().manual_seed(31)
    c = make_client(tmp_path, device_pages=4, host_pages=3, disk_pages=10, pinned_tail_pages=1)
    ref = Reference()
    a = new_seq(c, ref)
    assert c.stats()["bytes_moved"] == {}
    pool = c.stats()["pool"]
    assert (pool["pages_device"], pool["pages_host"], pool["pages_disk"]) == (0, 0, 0)
    assert (pool["free_device"], pool["free_host"], pool["free_disk"]) == (4, 3, 10)

    append(c, ref, a, gen, 4 * P)  # fills the device
    assert c.stats()["bytes_moved"] == {}
    for n in range(1, 4):  # each new page sends one page to the host
        append(c, ref, a, gen, P)
        s = c.stats()
        assert s["bytes_moved"] == {"host<-device": n * KV_PAGE_BYTES}, s
        assert (s["pool"]["pages_device"], s["pool"]["pages_host"], s["pool"]["pages_disk"]) == (4, n, 0)
    append(c, ref, a, gen, 2 * P)  # host full: its 2 oldest pages go to disk, 2 device pages to the host
    s = c.stats()
    assert s["bytes_moved"] == {"host<-device": 5 * KV_PAGE_BYTES, "disk<-host": 2 * KV_PAGE_BYTES}, s
    assert (s["pool"]["pages_device"], s["pool"]["pages_host"], s["pool"]["pages_disk"]) == (4, 3, 2)
    assert (s["pool"]["free_device"], s["pool"]["free_host"], s["pool"]["free_disk"]) == (0, 0, 8)
    assert c.store.pool_usage() == s["pool"]

    c.prefetch(a, [0, 1])  # pages 0, 1 are on disk: 2 pages up from disk, 2 down to the host, 2 host->disk
    s = c.stats()
    assert s["bytes_moved"] == {
        "host<-device": 7 * KV_PAGE_BYTES, "disk<-host": 4 * KV_PAGE_BYTES, "device<-disk": 2 * KV_PAGE_BYTES,
    }, s
    # Per tier, pages in minus pages out == pages there.
    m = {k: v // KV_PAGE_BYTES for k, v in s["bytes_moved"].items()}
    pool = s["pool"]
    assert m["host<-device"] - m["disk<-host"] - m.get("device<-host", 0) == pool["pages_host"]
    assert m["disk<-host"] + m.get("disk<-device", 0) - m["device<-disk"] == pool["pages_disk"]
    check_tiers(c, [a])
    assert_reads_back(c, ref)

    # Attention's moves add to the totals, per direction, and per-method counters appear.
    before = c.stats()["bytes_moved"]  # (the reads above moved rows up too)
    q = torch.randn((1, HKV, D), generator=gen)
    result = c.attend([a], 0, q, "dense", backend="torch")
    assert set(result.bytes_moved) == {"device<-host", "device<-disk"}
    after = c.stats()
    for key, n in result.bytes_moved.items():
        assert n > 0 and after["bytes_moved"][key] == before.get(key, 0) + n
    assert after["methods"]["dense"]["calls"] == 1
    assert after["methods"]["dense"]["bytes_read"] == result.bytes_read


def test_all_layer_append_fits_beside_other_pinned_tails(tmp_path):
    """The device (4 pages) holds a's pinned tail (2) and b's (up to 2): an append to b of all layers
    at once must succeed, as the same positions appended one layer at a time do."""
    gen = torch.Generator().manual_seed(37)
    rng = random.Random(37)
    c = make_client(tmp_path, device_pages=4, host_pages=20, pinned_tail_pages=2)
    ref = Reference()
    a, b, b2 = new_seq(c, ref), new_seq(c, ref), new_seq(c, ref)
    append(c, ref, a, gen, 3 * P)
    # One row and one layer at a time (decode steps): accepted.
    for _ in range(1 + P):
        append_rows_per_layer(c, ref, b2, gen, rng)
    check_tiers(c, [a, b2])
    c.free(b2)
    ref.drop(b2)
    # All layers at once, the same positions: must be accepted too.
    append(c, ref, b, gen, 1)
    append(c, ref, b, gen, P)
    check_tiers(c, [a, b])
    assert_reads_back(c, ref)
