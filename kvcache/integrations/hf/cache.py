"""KVCacheCache: a transformers Cache whose keys and values live in a kvcache store, one sequence per batch row
(docs/transformers.md).

A forward of the model is begun by the hook kvcache.integrations.hf.attention installs (it sees the token ids and the
2-D attention mask); each layer's `update` only checks the call, and the layer's attention function calls `attend`:
a prefill forward attends each row here by SDPA and appends its new keys and values to the row's sequence after the
last layer, one append per row; a decode forward is one planned step of the store (begin_step), one attend call per
layer that appends the new row and attends by the chosen method.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvcache.clients.inprocess import KVCacheClient
from kvcache.integrations.hf.checks import ModelShape, check_store, check_supported
from kvcache.integrations.hf.choice import MethodChoice, scale_for
from kvcache.integrations.hf.imports import load_transformers
from kvcache.integrations.hf.prefill import causal_attention, read_prefix
from kvcache.integrations.hf.rows import CacheTotals, Forward, Row, Sequences, real_columns

_cache_utils = load_transformers("cache_utils")


class StoreLayer(_cache_utils.CacheLayerMixin):
    """A layer of a KVCacheCache as transformers inspects it: lengths for masks and positions; the data is in the
    store, so it cannot be read, cropped or compiled here."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: KVCacheCache) -> None:
        super().__init__()
        # Weak: without a cycle, a cache dropped after generate is freed (its sequences with it) at once.
        self._cache = weakref.ref(cache)
        self.is_initialized = True

    @property
    def cache(self) -> KVCacheCache:
        return self._cache()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the store was allocated when it was made."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("a KVCacheCache's layers are updated through the cache (KVCacheCache.update)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.columns

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.x renamed it


class KVCacheCache(_cache_utils.Cache):
    """A transformers Cache backed by a kvcache store through `client` (an InProcessClient or a RemoteClient): prefill
    is dense into the store, every decode step attends through `method` (dense, sparq, quest, window, gate) with
    `params`, or with the parameters that read `share` of dense attention's bytes. The model must be prepared with
    kvcache.integrations.transformers.use_kvcache(model). Free its sequences with `release()` (or `with`)."""

    def __init__(self, client: KVCacheClient, method: str = "dense", params: Mapping[str, Any] | None = None, *,
                 share: float | None = None,
                 layer_methods: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None,
                 backend: str = "auto", config: Any = None, lease_seconds: float | None = None) -> None:
        super().__init__(layers=[])
        self.client = client
        self.sequences = Sequences(client)
        weakref.finalize(self, self.sequences.free_all).atexit = False
        self.choice = MethodChoice(method, dict(params or {}), share, dict(layer_methods or {}))
        self.backend = backend
        self.lease_seconds = lease_seconds
        self.shape: ModelShape | None = None
        self.rows: list[Row] = []
        self.columns = 0  # columns of input the model has run: what transformers calls the cache's length
        self.totals = CacheTotals()
        self._forward: Forward | None = None
        self._broken: str | None = None
        if config is not None:
            self.bind(config)

    # ---- set-up -------------------------------------------------------------------------------

    def bind(self, config: Any) -> ModelShape:
        """Check the model of `config` against the supported family and the store's shape (once; later calls must name
        the same shape)."""
        shape = check_supported(config)
        if self.shape is None:
            check_store(self.client.config, shape)
            self.shape = shape
            self.layers = [StoreLayer(self) for _ in range(shape.num_layers)]
        elif shape != self.shape:
            raise ValueError(f"this cache serves a model of shape {self.shape}, not {shape}")
        return shape

    def set_method(self, method: str, params: Mapping[str, Any] | None = None, *, share: float | None = None,
                   layer_methods: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None) -> None:
        """Decode with another method from the next forward on."""
        self.choice = MethodChoice(method, dict(params or {}), share, dict(layer_methods or {}))

    def reuse_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Open each row's sequence from its prompt (input_ids [B, T], padding marked 0 in attention_mask) before
        generate runs, so that the pages the store's prefix cache holds are reused and the model does not run those
        tokens again; returns the columns generate will skip (transformers slices the prompt by the cache's length)."""
        if self.rows:
            raise ValueError("reuse_prefix opens the rows: call it on a cache no forward has used")
        real = real_columns(attention_mask, input_ids.shape[0], input_ids.shape[1], input_ids.shape[1])
        cols = [torch.nonzero(r).flatten() for r in real]
        self._open_rows([input_ids[b, c].tolist() for b, c in enumerate(cols)])
        # The columns every row can skip: all before each row's first position the store does not hold.
        skip = min(int(c[row.held]) if row.held < len(c) else input_ids.shape[1] - 1 for c, row in zip(cols, self.rows))
        for c, row in zip(cols, self.rows):
            row.fed = int((c < skip).sum())
            self.totals.skipped_tokens += row.fed
        self.columns = skip
        return skip

    def _open_rows(self, prompts: Sequence[list[int] | None]) -> None:
        """One new sequence per row; full pages of a row's tokens already in the store are reused."""
        try:
            for tokens in prompts:
                info = self.client.create(token_ids=tokens, lease_seconds=self.lease_seconds)
                self.sequences.ids.add(info.seq_id)
                self.rows.append(Row(info.seq_id, info.length))
                self.totals.reused_tokens += info.cached_tokens
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Free every row's sequence (their pages stay in the prefix cache while other sequences hold them)."""
        rows, self.rows = self.rows, []
        self.columns = 0
        self._forward = None
        self._broken = None
        for row in rows:
            self.sequences.free(row.seq_id)

    def __enter__(self) -> KVCacheCache:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- a forward ----------------------------------------------------------------------------

    def begin_forward(self, config: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      inputs_embeds: torch.Tensor | None = None) -> None:
        """Start a forward of the model over input_ids [B, T] (or inputs_embeds [B, T, h]); attention_mask [B, C + T]
        marks padding 0 over the C columns run before and these."""
        if self._broken is not None:
            raise RuntimeError(f"this KVCacheCache is unusable: {self._broken}; release() it and start again")
        if self._forward is not None:
            raise RuntimeError("a forward of this KVCacheCache is already running")
        self.bind(config)
        given = input_ids if input_ids is not None else inputs_embeds
        if given is None:
            raise ValueError("a forward needs input_ids or inputs_embeds")
        B, T = given.shape[:2]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("a KVCacheCache takes a 2-D attention mask (1 for tokens, 0 for padding), "
                             f"not one of shape {tuple(attention_mask.shape)}")
        real = real_columns(attention_mask, B, T, self.columns + T)
        cols = [torch.nonzero(r).flatten() for r in real]
        tokens = [None if input_ids is None else input_ids[b, c].tolist() for b, c in enumerate(cols)]
        if not self.rows:
            self._open_rows(tokens)
        elif len(self.rows) != B:
            raise ValueError(f"this cache holds {len(self.rows)} rows; the forward brings {B}")
        decode = T == 1 and all(len(c) == 1 for c in cols) and all(r.held == r.fed for r in self.rows)
        self._forward = Forward(T, [c.to(given.device) for c in cols], tokens, decode,
                                keys=[[] for _ in range(B)], values=[[] for _ in range(B)])

    def end_forward(self) -> None:
        """After the model's forward, finished or not: a forward that stopped part way through a decode step leaves
        the rows' sequences holding the new position in some layers only, and the cache unusable."""
        fw, self._forward = self._forward, None
        if fw is not None and fw.decode and fw.attended > 0:
            self._broken = f"a decode step stopped after {fw.attended} of {len(self.layers)} layers"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each attention layer with its new keys and values [B, Hkv, T, d]: returned as they are, for the
        attention function (`attend`) that writes them to the store."""
        fw = self._forward
        if fw is None:
            raise RuntimeError("a KVCacheCache serves only a model prepared with "
                               "kvcache.integrations.transformers.use_kvcache(model)")
        if layer_idx != fw.attended:
            raise RuntimeError(f"layer {layer_idx} updated the cache while layer {fw.attended} has not attended "
                               "through it: the model's attention implementation must be 'kvcache' (use_kvcache)")
        return key_states, value_states

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of layer `layer`: q [B, Hq, T, d] over each row's cache and k, v [B, Hkv, T, d]; returns
        [B, T, Hq, d] (zeros at padding columns)."""
        fw = self._forward
        if fw is None or layer != fw.attended:
            raise RuntimeError(f"layer {layer} attends outside a forward of this cache, or out of order")
        scale = scale_for(scaling, q.shape[-1])
        out = self._decode_layer(fw, layer, q, k, v, scale) if fw.decode else self._prefill_layer(fw, layer, q, k, v,
                                                                                                   scaling)
        fw.attended += 1
        if fw.attended == len(self.layers):
            self._finish(fw)
        return out

    def _prefill_layer(self, fw: Forward, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        out = torch.zeros_like(q)
        for b, row in enumerate(self.rows):
            cols = fw.real[b]
            if not len(cols):
                continue
            kb, vb = k[b][:, cols], v[b][:, cols]  # [Hkv, t, d]
            keys, values = kb, vb
            if row.fed:  # earlier positions: from the store (a reused prefix, an earlier chunk)
                past_k, past_v = read_prefix(self.client, row.seq_id, layer, row.fed, kb)
                keys, values = torch.cat((past_k, kb), dim=1), torch.cat((past_v, vb), dim=1)
            out[b][:, cols] = causal_attention(q[b][:, cols], keys, values, scaling)
            held = min(max(row.held - row.fed, 0), len(cols))  # positions the store has already (a reused prefix)
            fw.keys[b].append(kb[:, held:].detach())
            fw.values[b].append(vb[:, held:].detach())
        return out.transpose(1, 2)

    def _decode_layer(self, fw: Forward, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
        dtype = self.client.config.dtype
        if fw.step is None:
            shortest = min(row.held for row in self.rows) + 1
            fw.method, params = self.choice.for_step(shortest, self.client.config, scale)
            fw.step = self.client.begin_step([row.seq_id for row in self.rows], q.shape[1], fw.method, params,
                                             self.backend, self.choice.layers_for_step(scale) or None)
        # The store's attention has no gradient: what goes in is detached.
        q1, k1, v1 = (t[:, :, 0].detach().to(dtype) for t in (q, k, v))
        result = fw.step.attend(layer, q1, k1, v1)
        fw.bytes_read += result.bytes_read
        return result.out.to(q.device, q.dtype)[:, None]

    def _finish(self, fw: Forward) -> None:
        """After the last layer: a prefill's new rows go to the store (one append per row, every layer); the counts
        move on."""
        self._forward = None
        t = self.totals
        if fw.decode:
            for row in self.rows:
                row.held += 1
                row.fed += 1
            t.decode_steps += 1
            t.decode_tokens += len(self.rows)
            t.attention_bytes += fw.bytes_read
            t.steps_by_method[fw.method] = t.steps_by_method.get(fw.method, 0) + 1
        else:
            dtype = self.client.config.dtype
            for b, row in enumerate(self.rows):
                n = len(fw.real[b])
                if not n:
                    continue
                new_k = torch.stack(fw.keys[b]).transpose(1, 2)  # [L, new, Hkv, d]
                new_v = torch.stack(fw.values[b]).transpose(1, 2)
                if new_k.shape[1]:
                    ids = fw.tokens[b]
                    try:
                        self.client.append(row.seq_id, new_k.to(dtype), new_v.to(dtype),
                                           token_ids=None if ids is None else ids[n - new_k.shape[1]:])
                    except BaseException:
                        if b:  # the rows before hold this forward's tokens, this one and those after do not
                            self._broken = f"a prefill's append failed at row {b} of {len(self.rows)}"
                        raise
                row.fed += n
                row.held = max(row.held, row.fed)
                t.prefill_tokens += n
        self.columns += fw.columns

    # ---- transformers' Cache interface --------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of input run so far, padding included (transformers' positions and masks count them)."""
        return self.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.shape is not None

    def reset(self) -> None:
        """Free every row's sequence: the cache starts empty."""
        self.release()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("the store's sequences cannot be cut back: a KVCacheCache cannot be cropped "
                                      "(assisted decoding needs it)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes old row beam_idx[i] (beam search): a row taken twice is forked (its pages shared, copied on
        write), a row not taken is freed."""
        self._reindex([int(i) for i in beam_idx.tolist()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`, in that order."""
        self._reindex([int(i) for i in indices.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times in a row (forks of its sequence)."""
        self._reindex([b for b in range(len(self.rows)) for _ in range(repeats)])

    def _reindex(self, order: list[int]) -> None:
        if self._forward is not None:
            raise RuntimeError("the rows of a KVCacheCache are rearranged only between forwards")
        if not self.rows:
            return
        if any(not 0 <= i < len(self.rows) for i in order):
            raise IndexError(f"row indices {order} out of range for {len(self.rows)} rows")
        taken: set[int] = set()
        rows = []
        for i in order:
            old = self.rows[i]
            if i in taken:
                child = self.client.fork(old.seq_id).seq_id
                self.sequences.ids.add(child)
                rows.append(Row(child, old.held, old.fed))
            else:
                taken.add(i)
                rows.append(old)
        for i, old in enumerate(self.rows):
            if i not in taken:
                self.sequences.free(old.seq_id)
        self.rows = rows

    def __repr__(self) -> str:
        return (f"KVCacheCache(method={self.choice.method!r}, rows={len(self.rows)}, columns={self.columns}, "
                f"layers={len(self.layers)})")
