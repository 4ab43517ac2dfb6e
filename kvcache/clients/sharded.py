"""ShardedClient: one sequence spread over several KV servers by position blocks (Star Attention phase 2, §4).

Layout. A sharded sequence is one sub-sequence per shard. Shard i holds a contiguous run of the
sequence's positions and the runs follow shard order: shard 0 holds the first l_0 positions, shard 1
the next l_1, and so on. The last shard is the query host: decode tokens (attend's new_k/new_v) are
appended there and nowhere else. Attention does not depend on where a key sits (its position is
already rotated into it), so this order matters only to describe/fetch/prefetch, which map a
sequence's position or page index to a shard.

The sequence id is "<fingerprint>:<id_0>,<id_1>,...". The fingerprint is 8 hex digits of the shards'
names in order. So the id records its layout: a client over other endpoints, over the same ones in
another order, or over a different number of them refuses the id with InvalidParameter instead of
reading unrelated sequences. Other processes may fill the sub-sequences directly (the phase 1 ranks
of engine/star.py do): `sub_ids()` gives the ids, and `describe()` reads the lengths again afterwards.
Without that the client uses the lengths it saw last, and a shard that was changed behind its back
rejects the next append (its `start` no longer matches) instead of taking it silently.

Appends. `append` writes at the end of the sequence. Positions go to the open shard, which is the
last non-empty one (shard 0 if all are empty). A shard before the last stops taking positions once
it holds `block_size` of them, and the rest spill into the next shard; the last shard has no limit.
`append(..., shard=j)` puts all positions on shard j. Star's query goes to shard -1 that way. A shard
before the open one is sealed, because filling it again would break the position order. An append
that spans shards is written one shard after another in order. If one shard fails, the shards
before it keep their part: the sequence stays a valid prefix with no gap (describe shows what it
holds), and the call raises. Token ids (prefix caching) go to shard 0 only, because only shard 0's
keys are a true prefix of the sequence. A later shard's keys depend on how the context was encoded
(causal prefill or Star's anchor blocks), so equal tokens there do not mean equal K/V.

Attention. `attend` sends q to every shard that holds positions of the sequence, concurrently. Each
shard has one worker thread, so calls to one shard stay in order on one attend stream of its
RemoteClient while different shards overlap. The partial (out, lse) are merged by §4:
s = log sum_h exp(s_h), A = sum_h exp(s_h - s) A_h (kvcache.methods.merge_lse). Only q, out and
lse travel, never K/V. Dense attention over N shards equals single-server dense up to float
rounding. SparQ and Quest run on each shard with a per-shard budget proportional to the shard's
share of the positions (SparQ's k) or pages (Quest's top_pages), at least 1. SparQ's local window
goes to the last shard only, which holds the most recent positions. A shard whose budget covers all
its positions runs dense, which is exact and reads no more. Their merge is approximate, for two
reasons. First, each shard picks its top-k_i on its own approximate scores, so the union of the
picks is not the global top-k. Second, a SparQ part's lse is that of its exact stage-2 scores over
the rows it chose: a shard whose chosen rows cover less of its true attention mass is weighted too
low, and each part's mean-value reallocation (1 - alpha_h) * vbar_h uses only its own mean value.
Quest (and gate) parts are exact attention over the chosen pages, so only the page choice is approximate.

Failures. A shard error is raised as the same kvcache.errors class, with a message that names the
shard ("shard 1 (127.0.0.1:50052): ..."); the exception's `shard` attribute is its index. A shard
that is down or slower than `timeout` gives Unavailable (…[UNAVAILABLE] or [DEADLINE_EXCEEDED]). A
shard restarted without its data gives SequenceNotFound. Nothing is ever merged from some of the
shards only. Create and fork run on all shards at once. If any shard fails, the sub-sequences made
on the others are freed before the error is raised, including those that complete after a deadline,
so no half sequence is left. `free` is attempted on every shard even when one fails, and the first
failure is raised. When a decode step fails on another shard, the query host may already have
appended that layer's token; the step then raised and must not be retried as if nothing had
happened (the engine frees the sequence on errors). The other shards' sub-sequences are untouched
and stay usable through their own servers.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from typing_extensions import Self

from kvcache import errors
from kvcache.clients.inprocess import FetchKind, FetchResult, KVCacheClient, PlannedCalls
from kvcache.config import KVCacheConfig
from kvcache.methods import AttentionResult, merge_lse
from kvcache.methods.attend import check_new_rows, check_query, check_sequences
from kvcache.methods.coverage import merged_coverage
from kvcache.methods.registry import METHODS
from kvcache.stats import merge_coverage
from kvcache.store import SequenceInfo
from kvcache.store.step_plan import StepPlan

T = TypeVar("T")


class ShardedClient:
    """KVCacheClient over N shards (endpoints "host:port" or client objects); see the module docstring."""

    def __init__(
        self,
        shards: Sequence[str | KVCacheClient],
        *,
        block_size: int = 4096,
        names: Sequence[str] | None = None,
        timeout: float = 30.0,
        token: str | None = None,
        **remote_options: Any,
    ) -> None:
        """shards: "host:port" strings (a RemoteClient is made for each, with `token`, `timeout` and
        `remote_options`) or KVCacheClient objects. block_size: positions a shard before the last takes
        from appends before they spill to the next. names: what errors and the id fingerprint call each
        shard (default: the endpoint, or "shard<i>"). timeout: seconds any shard's call may take."""
        if not shards:
            raise errors.InvalidParameter("a sharded client needs at least one shard")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise errors.InvalidParameter(f"block_size={block_size!r} must be a positive int")
        self._owned: list[Any] = []
        clients: list[Any] = []
        for shard in shards:
            if isinstance(shard, str):
                from kvcache.clients.remote import RemoteClient

                client = RemoteClient(shard, token=token, timeout=timeout, **remote_options)
                self._owned.append(client)
                clients.append(client)
            else:
                clients.append(shard)
        self.shards: list[Any] = clients
        if names is None:
            names = [s if isinstance(s, str) else f"shard{i}" for i, s in enumerate(shards)]
        if len(names) != len(clients):
            raise errors.InvalidParameter(f"{len(names)} names for {len(clients)} shards")
        self.names = [str(n) for n in names]
        self.fingerprint = hashlib.sha1("\n".join(self.names).encode()).hexdigest()[:8]
        self.block_size = block_size
        self.timeout = timeout
        # One worker per shard: calls to a shard keep their order (one attend stream), shards overlap.
        self._pools = [cf.ThreadPoolExecutor(1, thread_name_prefix=f"kvcache-shard{i}") for i in range(len(clients))]
        self._lock = threading.Lock()
        # Per sharded sequence, as last seen by this client: [shard][layer] positions, and pages per shard.
        self._lengths: dict[str, list[list[int]]] = {}
        self._pages: dict[str, list[int]] = {}
        self._cached: dict[str, int] = {}  # prefix-cache hits of shard 0 at create
        self._config: KVCacheConfig | None = None

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    # ---- protocol --------------------------------------------------------------------------

    @property
    def config(self) -> KVCacheConfig:
        """Shard 0's store config, after checking that every shard stores the same shape and dtype."""
        if self._config is None:
            configs = self._fan({i: (lambda c=c: c.config) for i, c in enumerate(self.shards)})
            first = configs[0]
            key = _shape_of(first)
            for i in range(1, self.num_shards):
                if _shape_of(configs[i]) != key:
                    raise errors.InvalidParameter(
                        f"shard {i} ({self.names[i]}) stores (layers, kv heads, head dim, page size, dtype) = "
                        f"{_shape_of(configs[i])}; shard 0 ({self.names[0]}) stores {key}")
            self._config = first
        return self._config

    def create(self, token_ids: Sequence[int] | None = None, lease_seconds: float | None = None) -> SequenceInfo:
        """New sequence: one sub-sequence per shard (all or none), each with the lease; `token_ids` go to shard 0's
        prefix cache."""
        ids = None if token_ids is None else [int(t) for t in token_ids]
        lease = {} if lease_seconds is None else {"lease_seconds": lease_seconds}
        calls = {i: (lambda c=c, i=i: c.create(token_ids=ids if i == 0 else None, **lease))
                 for i, c in enumerate(self.shards)}
        return self._make_all(calls)

    def fork(self, seq_id: str) -> SequenceInfo:
        """New sequence sharing every shard's pages of `seq_id` (copy-on-write), on all shards or none."""
        subs = self._parse(seq_id)
        calls = {i: (lambda c=c, s=s: c.fork(s)) for i, (c, s) in enumerate(zip(self.shards, subs))}
        return self._make_all(calls)

    def free(self, seq_id: str) -> None:
        """Free every shard's sub-sequence; each shard is tried, and the first failure is raised."""
        subs = self._parse(seq_id)
        with self._lock:
            self._lengths.pop(seq_id, None)
            self._pages.pop(seq_id, None)
            self._cached.pop(seq_id, None)
        self._fan({i: (lambda c=c, s=s: c.free(s)) for i, (c, s) in enumerate(zip(self.shards, subs))})

    def describe(self, seq_id: str) -> SequenceInfo:
        """The union of the shards' sub-sequences (lengths and pages summed); refreshes this client's view."""
        subs = self._parse(seq_id)
        infos = self._fan({i: (lambda c=c, s=s: c.describe(s)) for i, (c, s) in enumerate(zip(self.shards, subs))})
        return self._remember(seq_id, [infos[i] for i in range(self.num_shards)])

    def append(
        self,
        seq_id: str,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int | None = None,
        start: int | None = None,
        token_ids: Sequence[int] | None = None,
        shard: int | None = None,
    ) -> SequenceInfo:
        """Write K/V for new positions at the end of the sequence: [L, T, Hkv, d], or [T, Hkv, d] for `layer`.

        Placement as the module docstring says (open shard, spill at block_size), or all on `shard`.
        `start`, if given, must equal the sequence's length (at `layer`, or in every layer).
        """
        subs = self._parse(seq_id)
        lens, _ = self._view(seq_id)
        layers = self._layers(layer)
        if not isinstance(k, torch.Tensor) or k.dim() != (4 if layer is None else 3):
            want = "[L, T, Hkv, d]" if layer is None else "[T, Hkv, d]"
            got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
            raise errors.ShapeMismatch(f"k has shape {got}; expected {want}")
        axis = 0 if layer is not None else 1
        num_new = k.shape[axis]
        current = []
        for i in range(self.num_shards):
            held = {lens[i][layer_idx] for layer_idx in layers}
            if len(held) > 1:
                raise errors.PositionOutOfRange(f"shard {i} ({self.names[i]}) holds different lengths "
                                                f"{sorted(held)} in its layers; append one layer at a time")
            current.append(held.pop())
        total = sum(current)
        if start is not None and start != total:
            raise errors.PositionOutOfRange(f"sequence {seq_id}: append at position {start}, but the next position "
                                            f"is {total}")
        ids = None if token_ids is None else [int(t) for t in token_ids]
        if ids is not None and len(ids) != num_new:
            raise errors.ShapeMismatch(f"{len(ids)} token ids for {num_new} positions")
        info = None
        for i, offset, n in self._place(current, num_new, shard):
            piece_k, piece_v = k.narrow(axis, offset, n), v.narrow(axis, offset, n)
            piece_ids = ids[offset : offset + n] if ids is not None and i == 0 else None
            info = self._call(i, lambda i=i, pk=piece_k, pv=piece_v, pi=piece_ids, s=current[i]: self.shards[i].append(
                subs[i], pk, pv, layer=layer, start=s, token_ids=pi))
            with self._lock:
                for layer_idx in layers:
                    lens[i][layer_idx] += n
                self._pages.setdefault(seq_id, [0] * self.num_shards)[i] = info.num_pages
        return self._union_from_cache(seq_id)

    def attend(
        self,
        seq_ids: Sequence[str],
        layer: int,
        q: torch.Tensor,
        method: str = "dense",
        params: Mapping[str, Any] | None = None,
        new_k: torch.Tensor | None = None,
        new_v: torch.Tensor | None = None,
        backend: str = "auto",
        plan: StepPlan | None = None,
    ) -> AttentionResult:
        """Attention of q [B, Hq, d] over every shard, merged by lse (docs/sparse-attention.md §4); new_k/new_v
        [B, Hkv, d] go to the last shard. Dense is exact; sparq/quest run per shard with per-shard budgets
        (approximate merge). A plan (plan_step) is checked against the call; the shards are called per call."""
        c = self.config
        self._layers(layer)
        B = len(seq_ids)
        if plan is not None and (tuple(seq_ids) != plan.seq_ids or (new_k is not None) != bool(plan.new_tokens)):
            raise errors.PlanStale("the call does not match its step's plan (sequences, or whether it appends)")
        check_new_rows(c, B, new_k, new_v)
        check_query(c, q, B)
        check_sequences(seq_ids)
        subs = [self._parse(s) for s in seq_ids]
        views = [self._view(s)[0] for s in seq_ids]
        last = self.num_shards - 1
        # Positions each row sees on each shard during this call (the new token counts on the last shard).
        held = [[views[b][i][layer] + (1 if new_k is not None and i == last else 0) for i in range(self.num_shards)]
                for b in range(B)]
        for b in range(B):
            if sum(held[b]) == 0:
                raise errors.PositionOutOfRange(f"sequence {seq_ids[b]} has no cached positions at layer {layer}")
        totals = [sum(h) for h in held]
        extra = {} if backend == "auto" else {"backend": backend}
        calls: dict[int, Callable[[], AttentionResult]] = {}
        rows_of: dict[int, list[int]] = {}
        for i, client in enumerate(self.shards):
            rows = [b for b in range(B) if held[b][i] > 0]
            if not rows:
                continue
            rule = shard_budget(method, dict(params or {}), [held[b][i] for b in rows], [totals[b] for b in rows],
                                is_last=i == last, page_size=c.page_size, starts=[sum(held[b][:i]) for b in rows])
            if rule is None and i != last:  # nothing of these rows' choice lies on this shard
                continue
            rule = rule or (method, dict(params or {}))
            m, p = rule
            idx = torch.tensor(rows)
            shard_q = q if len(rows) == B else q[idx]
            new = {"new_k": new_k, "new_v": new_v} if i == last and new_k is not None else {}
            rows_of[i] = rows
            calls[i] = (lambda client=client, ids=[subs[b][i] for b in rows], sq=shard_q, m=m, p=p, new=new:
                        client.attend(ids, layer, sq, method=m, params=p, **new, **extra))
        results, failures = self._fan_all(calls)
        if new_k is not None and last in results:  # the query host appended, whatever happened elsewhere
            with self._lock:
                for b in range(B):
                    views[b][last][layer] += 1
        if failures:
            raise self._first(failures)
        if len(results) == 1 and len(next(iter(rows_of.values()))) == B:
            return next(iter(results.values()))
        outs = q.new_zeros((self.num_shards, *q.shape))
        lses = torch.full((self.num_shards, B, q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
        moved: dict[str, int] = {}
        for i, res in results.items():
            idx = torch.tensor(rows_of[i], device=q.device)
            outs[i, idx] = res.out.to(q.device, q.dtype)
            lses[i, idx] = res.lse.to(q.device, torch.float32)
            for key, n in res.bytes_moved.items():
                moved[key] = moved.get(key, 0) + n
        out, lse = merge_lse(outs, lses)
        coverage, fallback = _merged_estimates(results, rows_of, lses, q)
        return AttentionResult(out, lse, sum(r.bytes_read for r in results.values()), moved, coverage=coverage,
                               fallback=fallback)

    def begin_step(self, seq_ids: Sequence[str], q_heads: int, method: str = "dense",
                   params: Mapping[str, Any] | None = None, backend: str = "auto",
                   layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None = None) -> PlannedCalls:
        """A decode step planned once: each layer's attend(layer, q, new_k, new_v) is an attend with its plan."""
        return PlannedCalls(self, seq_ids, method, params, backend, layer_methods)

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1) -> StepPlan:
        """A step handle for the KVCacheClient protocol: which rows each shard serves changes with every call's
        lengths, so the shards are called per call (their page tables built per call) and the handle only checks
        that each call matches the step."""
        if isinstance(new_tokens, bool) or new_tokens not in (0, 1):
            raise errors.InvalidParameter(f"a step appends 0 or 1 positions per sequence, not {new_tokens!r}")
        for seq_id in seq_ids:
            self._parse(seq_id)
        return StepPlan(tuple(seq_ids), new_tokens, (), (), None)

    def fetch(self, seq_id: str, layer: int, what: FetchKind, index: torch.Tensor | None = None) -> FetchResult:
        """Raw reads over the union, as one sequence in position order (see InProcessClient.fetch for shapes).

        rows: global positions [Hkv, k] are split by shard and put back in the order asked;
        columns and summaries: the shards' parts concatenated; value_mean: the length-weighted mean.
        """
        subs = self._parse(seq_id)
        self.describe(seq_id)  # fresh lengths: fetch is not on the decode path
        lens, _ = self._view(seq_id)
        self._layers(layer)
        held = [lens[i][layer] for i in range(self.num_shards)]
        live = [i for i in range(self.num_shards) if held[i] > 0]
        c = self.config

        def run(i: int, idx: torch.Tensor | None) -> Callable[[], FetchResult]:
            return lambda: self.shards[i].fetch(subs[i], layer, what, idx)

        if what == "rows":
            if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != c.num_kv_heads:
                got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
                raise errors.ShapeMismatch(f"fetch 'rows' needs an index [Hkv={c.num_kv_heads}, n]; got {got}")
            total = sum(held)
            index = index.long()
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= total):
                raise errors.PositionOutOfRange(f"fetch 'rows' index out of range [0, {total})")
            starts = torch.tensor([0, *itertools.accumulate(held)], device=index.device)  # [N + 1]
            owner = torch.bucketize(index.contiguous(), starts[1:], right=True)  # [Hkv, k]: shard of each position
            parts: dict[int, torch.Tensor] = {}
            calls = {}
            for i in live:
                cols = (owner == i).any(dim=0).nonzero().flatten()
                if len(cols):
                    parts[i] = cols
                    local = (index[:, cols] - int(starts[i])).clamp(0, held[i] - 1)
                    calls[i] = run(i, local)
            got = self._fan(calls)
            shape = (c.num_kv_heads, index.shape[1], c.head_dim)
            keys = torch.zeros(shape, dtype=c.dtype)
            values = torch.zeros(shape, dtype=c.dtype)
            for i, res in got.items():
                mine = owner[:, parts[i]] == i  # [Hkv, n_i]
                sub_k, sub_v = (t.cpu() for t in res.tensors)
                keys[:, parts[i]] = torch.where(mine[..., None], sub_k, keys[:, parts[i]])
                values[:, parts[i]] = torch.where(mine[..., None], sub_v, values[:, parts[i]])
            return FetchResult((keys, values), sum(r.bytes_read for r in got.values()))
        got = self._fan({i: run(i, index) for i in live})
        nbytes = sum(r.bytes_read for r in got.values())
        if what == "columns":
            return FetchResult((torch.cat([got[i].tensors[0].cpu() for i in live], dim=-1),), nbytes)
        if what == "summaries":
            return FetchResult((torch.cat([got[i].tensors[0].cpu() for i in live], dim=0),), nbytes)
        if what == "value_mean":
            weighted = sum(got[i].tensors[0].cpu().float() * held[i] for i in live)
            return FetchResult((weighted / sum(held[i] for i in live),), nbytes)
        raise errors.InvalidParameter(f"unknown fetch kind {what!r}; expected columns, rows, value_mean or summaries")

    def prefetch(self, seq_id: str, pages: Sequence[int] | None = None) -> SequenceInfo:
        """Warm pages: indexes into the union's page table (shard 0's pages first); all pages if None."""
        subs = self._parse(seq_id)
        self.describe(seq_id)
        _, counts = self._view(seq_id)
        if pages is None:
            wanted: dict[int, list[int] | None] = {i: None for i in range(self.num_shards) if counts[i]}
        else:
            wanted = {}
            bounds = [0, *itertools.accumulate(counts)]
            for g in pages:
                g = int(g)
                if not 0 <= g < bounds[-1]:
                    raise errors.PositionOutOfRange(f"page index {g} out of range [0, {bounds[-1]})")
                i = next(j for j in range(self.num_shards) if bounds[j] <= g < bounds[j + 1])
                wanted.setdefault(i, []).append(g - bounds[i])
        self._fan({i: (lambda i=i, p=p: self.shards[i].prefetch(subs[i], p)) for i, p in wanted.items()})
        return self.describe(seq_id)

    def stats(self) -> dict[str, Any]:
        """Every shard's stats under "shards", and their sums under "pool", "methods", "bytes_moved" and "coverage"
        (each shard's estimates of its own part of the sequences)."""
        got = self._fan({i: (lambda c=c: c.stats()) for i, c in enumerate(self.shards)})
        per = [got[i] for i in range(self.num_shards)]
        pool: dict[str, Any] = {}
        methods: dict[str, dict[str, float]] = {}
        moved: dict[str, int] = {}
        for s in per:
            for key, n in s.get("pool", {}).items():
                if isinstance(n, (int, float)):
                    pool[key] = pool.get(key, 0) + n
            for m, fields in s.get("methods", {}).items():
                into = methods.setdefault(m, {})
                for f, n in fields.items():
                    into[f] = into.get(f, 0) + n
            for key, n in s.get("bytes_moved", {}).items():
                moved[key] = moved.get(key, 0) + n
        return {"shards": per, "pool": pool, "methods": methods, "bytes_moved": moved,
                "coverage": merge_coverage([s.get("coverage", {}) for s in per])}

    def sparse_index(self, seq_id: str, layer: int, *args: Any, **kwargs: Any) -> Any:
        """MInference indices are not served over shards (a chunk's index needs every shard's keys)."""
        raise errors.NotSupported("sparse_index over shards is not implemented; prefill through one server")

    def sparse_prefill(self, seq_id: str, layer: int, *args: Any, **kwargs: Any) -> Any:
        """Served sparse prefill is not available over shards (see sparse_index)."""
        raise errors.NotSupported("sparse_prefill over shards is not implemented; prefill through one server")

    # ---- sharding --------------------------------------------------------------------------

    def sub_ids(self, seq_id: str) -> list[str]:
        """The sub-sequence id on each shard."""
        return self._parse(seq_id)

    def shard_lengths(self, seq_id: str) -> list[int]:
        """Positions each shard holds (the minimum over layers), as this client last saw them."""
        lens, _ = self._view(seq_id)
        return [min(row) for row in lens]

    def close(self) -> None:
        """Stop the shard threads and close the RemoteClients this client made."""
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for client in self._owned:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------

    def _compose(self, subs: Sequence[str]) -> str:
        return f"{self.fingerprint}:{','.join(subs)}"

    def _parse(self, seq_id: str) -> list[str]:
        if not isinstance(seq_id, str) or ":" not in seq_id:
            raise errors.SequenceNotFound(f"{seq_id!r} is not a sharded sequence id (fingerprint:id,id,...)")
        fingerprint, _, rest = seq_id.partition(":")
        subs = rest.split(",")
        if len(subs) != self.num_shards:
            raise errors.InvalidParameter(f"sequence {seq_id} is laid out over {len(subs)} shards; this client has "
                                          f"{self.num_shards} ({', '.join(self.names)})")
        if fingerprint != self.fingerprint:
            raise errors.InvalidParameter(f"sequence {seq_id} was made over other endpoints (layout {fingerprint}); "
                                          f"this client's are {', '.join(self.names)} (layout {self.fingerprint})")
        return subs

    def _view(self, seq_id: str) -> tuple[list[list[int]], list[int]]:
        """([shard][layer] lengths, pages per shard) as last seen; an unknown sequence is described first."""
        with self._lock:
            lens = self._lengths.get(seq_id)
            if lens is not None:
                return lens, self._pages[seq_id]
        self.describe(seq_id)
        with self._lock:
            return self._lengths[seq_id], self._pages[seq_id]

    def _remember(self, seq_id: str, infos: Sequence[SequenceInfo]) -> SequenceInfo:
        with self._lock:
            self._lengths[seq_id] = [list(info.lengths) for info in infos]
            self._pages[seq_id] = [info.num_pages for info in infos]
            self._cached[seq_id] = infos[0].cached_tokens
        return _union(seq_id, infos)

    def _union_from_cache(self, seq_id: str) -> SequenceInfo:
        with self._lock:
            lens, pages = self._lengths[seq_id], self._pages[seq_id]
            lengths = tuple(sum(row[layer_idx] for row in lens) for layer_idx in range(len(lens[0])))
            return SequenceInfo(seq_id, lengths, sum(pages), self._cached.get(seq_id, 0))

    def _layers(self, layer: int | None) -> list[int]:
        L = self.config.num_layers
        if layer is None:
            return list(range(L))
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < L:
            raise errors.InvalidParameter(f"layer {layer!r} out of range; the store has {L} layers")
        return [layer]

    def _place(self, current: list[int], num_new: int, shard: int | None) -> list[tuple[int, int, int]]:
        """(shard, offset in the chunk, count) of each piece of an append of num_new positions."""
        N = self.num_shards
        open_shard = max((i for i in range(N) if current[i] > 0), default=0)
        if shard is not None:
            if not isinstance(shard, int) or not -N <= shard < N:
                raise errors.InvalidParameter(f"shard={shard!r} out of range for {N} shards")
            j = shard % N
            if j < open_shard:
                raise errors.PositionOutOfRange(f"shard {j} ({self.names[j]}) is sealed: shard {open_shard} already "
                                                f"holds later positions")
            return [(j, 0, num_new)] if num_new else []
        pieces, offset, i = [], 0, open_shard
        while offset < num_new:
            room = num_new - offset if i == N - 1 else max(0, self.block_size - current[i])
            n = min(room, num_new - offset)
            if n:
                pieces.append((i, offset, n))
                offset += n
            i += 1
        return pieces

    def _make_all(self, calls: dict[int, Callable[[], SequenceInfo]]) -> SequenceInfo:
        """Run create/fork on every shard; on any failure free what was made (also what completes late)."""
        futures = {i: self._pools[i].submit(fn) for i, fn in calls.items()}
        _done, pending = cf.wait(futures.values(), timeout=self.timeout)
        failures: dict[int, BaseException] = {}
        made: dict[int, SequenceInfo] = {}
        for i, fut in futures.items():
            if fut in pending:
                failures[i] = self._late(i)
                fut.add_done_callback(lambda f, i=i: self._free_quietly(i, f))
            elif fut.exception() is not None:
                failures[i] = fut.exception()
            else:
                made[i] = fut.result()
        if failures:
            for i, info in made.items():
                self._free_quietly(i, info)
            raise self._first(failures)
        subs = [made[i].seq_id for i in range(self.num_shards)]
        return self._remember(self._compose(subs), [made[i] for i in range(self.num_shards)])

    def _free_quietly(self, i: int, made: SequenceInfo | cf.Future) -> None:
        if isinstance(made, cf.Future):
            if made.cancelled() or made.exception() is not None:
                return
            made = made.result()
        with contextlib.suppress(Exception):
            self.shards[i].free(made.seq_id)

    def _call(self, i: int, fn: Callable[[], T]) -> T:
        return self._fan({i: fn})[i]

    def _fan(self, calls: dict[int, Callable[[], T]]) -> dict[int, T]:
        results, failures = self._fan_all(calls)
        if failures:
            raise self._first(failures)
        return results

    def _fan_all(self, calls: dict[int, Callable[[], T]]) -> tuple[dict[int, T], dict[int, BaseException]]:
        """Run calls[i] on shard i's thread, all at once; wait for all (up to the timeout)."""
        futures = {i: self._pools[i].submit(fn) for i, fn in calls.items()}
        _, pending = cf.wait(futures.values(), timeout=self.timeout)
        results: dict[int, T] = {}
        failures: dict[int, BaseException] = {}
        for i, fut in futures.items():
            if fut in pending:
                failures[i] = self._late(i)
            elif fut.exception() is not None:
                failures[i] = fut.exception()
            else:
                results[i] = fut.result()
        return results, failures

    def _late(self, i: int) -> errors.Unavailable:
        return errors.Unavailable(f"no reply within {self.timeout} s [DEADLINE_EXCEEDED]")

    def _first(self, failures: dict[int, BaseException]) -> BaseException:
        """The failure of the lowest shard, as the same error class with a message naming the shard."""
        i = min(failures)
        exc = failures[i]
        message = f"shard {i} ({self.names[i]}): {exc}"
        if isinstance(exc, errors.KVCacheError):
            try:
                labelled = type(exc)(message)
            except TypeError:  # an error class with another constructor
                labelled = errors.RemoteError(message)
        else:
            labelled = errors.RemoteError(f"{message} ({type(exc).__name__})")
        labelled.shard = i  # type: ignore[attr-defined]
        labelled.__cause__ = exc
        return labelled


def shard_budget(method: str, params: dict, held: list[int], totals: list[int], is_last: bool,
                 page_size: int, starts: list[int] | None = None) -> tuple[str, dict] | None:
    """The method and parameters one shard runs for its rows, by the method's shard rule (AttentionMethod.shard),
    or None if the shard has nothing to read for them.

    held: positions each batch row has on this shard (> 0); totals: the rows' positions on all shards; starts: the
    rows' positions on the shards before (default: none before a shard that is not the last, all the others'
    before the last). The parameters come back in the form they were given: the names given, and any the rule
    changed from their default. An unknown method or parameters pass through unchanged, for the shard to refuse.
    """
    if starts is None:
        starts = [t - h for h, t in zip(held, totals)] if is_last else [0] * len(held)
    m = METHODS.get(method)
    if m is None:
        return method, params
    try:
        p = m.parse(params)
    except errors.InvalidParameter:
        return method, params
    rule = m.shard(p, held, totals, starts, is_last, page_size)
    if rule is None:
        return None
    name, shard_params = rule
    return name, shard_params.like(params)


def _shape_of(c: KVCacheConfig) -> tuple:
    return (c.num_layers, c.num_kv_heads, c.head_dim, c.page_size, str(c.dtype).removeprefix("torch."))


def _union(seq_id: str, infos: Sequence[SequenceInfo]) -> SequenceInfo:
    lengths = tuple(sum(info.lengths[layer_idx] for info in infos) for layer_idx in range(len(infos[0].lengths)))
    return SequenceInfo(seq_id, lengths, sum(info.num_pages for info in infos), infos[0].cached_tokens)


def _merged_estimates(results: Mapping[int, AttentionResult], rows_of: Mapping[int, list[int]], lses: torch.Tensor,
                      q: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The shards' coverage [B, Hq] merged (merged_coverage; None if a shard had no estimate) and fallback [B]: set
    where any shard fell back (None if none was asked)."""
    covers = torch.ones_like(lses)
    fallback = None
    for i, res in results.items():
        if res.coverage is None:
            return None, None
        idx = torch.tensor(rows_of[i], device=q.device)
        covers[i, idx] = res.coverage.to(q.device, torch.float32)
        if res.fallback is not None:
            fallback = torch.zeros(q.shape[0], dtype=torch.bool) if fallback is None else fallback
            fallback[torch.tensor(rows_of[i])] |= res.fallback.cpu()
    return merged_coverage(lses, covers), fallback

