"""Page-gate weights on disk (safetensors, one file per model) and the gate a store holds.

A file holds q_weight [L, Hkv, G*d, dg], q_bias [L, Hkv, dg], k_weight [L, Hkv, 3d, dg] and, in its
metadata, the GateShape (layers, kv heads, group, head dim, page size, gate dim, RoPE base), the
model it was trained for, and a crc32 of every tensor's bytes: a truncated file fails to parse,
a changed byte fails its checksum, a file for another model shape is refused; nothing is loaded
then. Names resolve to kvcache/methods/gates/<name>.safetensors (`kvcache train-gate` writes there).
"""

from __future__ import annotations

import json
import os
import pathlib
import weakref
import zlib
from collections.abc import Callable

import torch

from kvcache.errors import GateFileInvalid, GateMissing
from kvcache.kernels.gate_keys import gate_page_keys_triton, rope_inverse_frequencies
from kvcache.methods.gate_model import GateShape, LayerGate, PageGate, gate_keys, page_summaries, pooled_keys, unrotate

FORMAT = "kvcache-page-gate/1"
GATES_DIR = pathlib.Path(__file__).resolve().parent / "gates"
DEFAULT_GATE = "smollm2-135m"
TRAIN_COMMAND = "kvcache train-gate --name smollm2-135m"
_TENSORS = ("q_weight", "q_bias", "k_weight")


def gate_path(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A path as given if it names a file (or ends in .safetensors), else kvcache/methods/gates/<name>.safetensors."""
    p = pathlib.Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        return p
    return GATES_DIR / f"{name_or_path}.safetensors"


def _crc(t: torch.Tensor) -> str:
    return f"{zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes()):08x}"


def save_gate(gate: PageGate, path: str | os.PathLike, model: str = "", extra: dict | None = None) -> pathlib.Path:
    """Write the gate's weights (float32) and shape to `path` (a name resolves under kvcache/methods/gates/)."""
    from safetensors.torch import save_file

    path = gate_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(gate, n).detach().float().cpu().contiguous() for n in _TENSORS}
    meta = {"format": FORMAT, "shape": json.dumps(gate.shape.as_dict()), "model": model,
            "crc32": json.dumps({n: _crc(t) for n, t in tensors.items()}), "extra": json.dumps(extra or {})}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_gate(path: str | os.PathLike, expect: dict | None = None) -> PageGate:
    """The gate in `path` (or kvcache/methods/gates/<name>.safetensors).

    `expect` maps GateShape fields (num_layers, num_kv_heads, group, head_dim, page_size) to the
    values the model and store need; any that differ raise GateFileInvalid, as does a file that is
    missing, truncated, corrupt (checksum) or whose tensors disagree with its metadata.
    """
    from safetensors import safe_open

    path = gate_path(path)
    if not path.is_file():
        raise GateMissing(f"no gate weights at {path}; train them with `{TRAIN_COMMAND}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in _TENSORS}
    except Exception as exc:  # safetensors raises its own error types for a bad header or short data
        raise GateFileInvalid(f"gate file {path} is unreadable (truncated or corrupt?): {exc}") from exc
    if meta.get("format") != FORMAT:
        raise GateFileInvalid(f"gate file {path} has format {meta.get('format')!r}; expected {FORMAT!r}")
    try:
        shape = GateShape(**json.loads(meta["shape"]))
        crcs = json.loads(meta["crc32"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GateFileInvalid(f"gate file {path} has unreadable metadata: {exc}") from exc
    for name, t in tensors.items():
        if crcs.get(name) != _crc(t):
            raise GateFileInvalid(f"gate file {path}: tensor {name} fails its crc32 (corrupt file)")
    gate = PageGate(shape)
    for name, t in tensors.items():
        want = tuple(getattr(gate, name).shape)
        if tuple(t.shape) != want:
            raise GateFileInvalid(f"gate file {path}: {name} has shape {tuple(t.shape)}; its metadata says {want}")
        if not torch.isfinite(t).all():
            raise GateFileInvalid(f"gate file {path}: {name} holds non-finite values")
        getattr(gate, name).data.copy_(t)
    check_gate_shape(shape, expect or {}, str(path))
    return gate.requires_grad_(False).eval()


def check_gate_shape(shape: GateShape, expect: dict, where: str) -> None:
    """Raise GateFileInvalid if any field of `expect` differs from the gate's shape."""
    wrong = {k: (getattr(shape, k), v) for k, v in expect.items() if getattr(shape, k) != v}
    if wrong:
        detail = ", ".join(f"{k}={have} (need {need})" for k, (have, need) in wrong.items())
        raise GateFileInvalid(f"gate {where} was trained for another shape: {detail}")


# ---- the gate a store holds, and its gate keys ------------------------------------------------

_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> (PageGate, GateKeyCache)


class GateKeyCache:
    """The gate key kg = RoPE(W_k [max, min, mean](page), page index) of every layer, page id and kv head (§3).

    A page's gate key depends only on its keys (their summary, or for a pre-RoPE gate its rows rotated
    back) and its index in its sequence, and a page id sits at the same index in every sequence
    holding it (forks and the prefix cache share leading pages in place; a freed id is rewritten from
    its first row before it is read again), so decode scoring reads these dg values per page instead
    of recomputing a [3d x dg] product and RoPE over every page each step. The store calls `update`
    after summaries change: a decode step recomputes only its last page. Values equal
    kvcache.methods.gate.gate_keys of gate_pooled on the same keys (the reference), rounded to `dtype`.
    """

    def __init__(self, gate: PageGate, summary: torch.Tensor, dtype: torch.dtype,
                 page_keys: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        L, N, H = summary.shape[:3]
        self.gate = gate
        self.summary = summary  # the pool's k_summary [L, N, Hkv, 3, d] (a reference: no store cycle)
        self.page_keys = page_keys  # the store's page_keys (a weak method): a pre-RoPE gate pools rows, not summaries
        self.keys = torch.zeros((L, N, H, gate.shape.gate_dim), dtype=dtype, device=summary.device)
        shape = gate.shape
        # update_step's one-launch kernel (kvcache.kernels.gate_keys) takes power-of-two tiles; else torch runs it.
        self._step_kernel = all(n & (n - 1) == 0 for n in (shape.page_size, shape.head_dim // 2, shape.gate_dim // 2))
        self._model_inv = (rope_inverse_frequencies(shape.head_dim, shape.model_rope_base, summary.device)
                           if shape.pre_rope else None)
        self._gate_inv = rope_inverse_frequencies(shape.gate_dim, shape.rope_base, summary.device)

    def update(self, layers: list[int], page_ids: torch.Tensor, indexes: torch.Tensor, fills: list[int]) -> None:
        """Recompute the keys of pages page_ids [n] (at page indexes [n] of their sequences, holding their first
        fills[i] rows) in `layers`."""
        if len(page_ids) == 0:
            return
        dev = self.summary.device
        if len(page_ids) == 1:
            # A decode step: a slice and an arange made on the device, because copying a CPU index
            # tensor to the GPU would wait for the stream on every append of every layer.
            pid, index = int(page_ids[0]), int(indexes[0])
            ids: slice | torch.Tensor = slice(pid, pid + 1)
            positions = torch.arange(index, index + 1, device=dev)
        else:
            ids, positions = page_ids.to(dev, torch.long), indexes.to(dev)
        held = self._held_rows(fills, dev) if self.gate.shape.pre_rope else None  # only a pre-RoPE gate reads rows
        with torch.no_grad():  # a gate being trained must not pull the store into its autograd graph
            for layer in layers:  # a decode step passes one layer; a prefill a few pages per layer
                if held is not None:
                    pooled = self._pooled_rows(layer, page_ids, positions, held)
                else:
                    pooled = pooled_keys(self.summary[layer, ids])
                self.keys[layer, ids] = gate_keys(self.gate.layer(layer), pooled, positions).to(self.keys.dtype)

    def update_step(self, layer: int, k_seq: torch.Tensor, page_ids: torch.Tensor, indexes: torch.Tensor,
                    fills: torch.Tensor) -> None:
        """update() of one decode step's pages at `layer`, from device tensors only (no host sync, no host tensor:
        a captured CUDA graph replays it): page_ids [B] int64 (their K at slots page_ids of k_seq [N, Hkv, P, d],
        the layer's pool: an untiered store), at page indexes [B] of their sequences, holding fills [B] rows."""
        shape = self.gate.shape
        if self._step_kernel and k_seq.is_cuda:
            g = self.gate.layer(layer)
            gate_page_keys_triton(k_seq, self.summary[layer], g.k_weight, self.keys[layer], page_ids, indexes, fills,
                                  self._model_inv, self._gate_inv)
            return
        with torch.no_grad():
            if shape.pre_rope:
                P = shape.page_size
                rows = torch.arange(P, device=page_ids.device)
                at = (indexes[:, None] * P + rows)[:, None, :]  # [B, 1, P] positions of the pages' rows
                back = unrotate(k_seq[page_ids], at, self.gate.shape.model_rope_base)
                pooled = pooled_keys(page_summaries(back, rows[None, :] < fills[:, None]))
            else:
                pooled = pooled_keys(self.summary[layer, page_ids])
            keys = gate_keys(self.gate.layer(layer), pooled, indexes).to(self.keys.dtype)
            self.keys[layer].index_copy_(0, page_ids, keys)

    def _held_rows(self, fills: list[int], dev: torch.device) -> torch.Tensor:
        """[n, P] bool: the rows each page holds; one page (a decode step) compares against an int, copying nothing."""
        rows = torch.arange(self.gate.shape.page_size, device=dev)
        if len(fills) == 1:
            return (rows < fills[0])[None]
        return rows[None, :] < torch.tensor(fills, device=dev)[:, None]

    def _pooled_rows(self, layer: int, page_ids: torch.Tensor, indexes: torch.Tensor,
                     held: torch.Tensor) -> torch.Tensor:
        """[max, min, mean] [n, Hkv, 3d] of the pages' held rows rotated back to position 0 (a pre-RoPE gate)."""
        P = self.gate.shape.page_size
        rows = self.page_keys()(layer, page_ids)  # [n, Hkv, P, d]
        at = (indexes[:, None] * P + torch.arange(P, device=rows.device))[:, None, :]  # [n, 1, P]
        return pooled_keys(page_summaries(unrotate(rows, at, self.gate.shape.model_rope_base), held))

    def layer(self, layer: int) -> torch.Tensor:
        """Gate keys of `layer` by page id [N, Hkv, dg]."""
        return self.keys[layer]


def attach_gate(store, gate: PageGate | str | os.PathLike, key_dtype: torch.dtype | None = None) -> PageGate:
    """Give `store` a page gate (an object, a path or a name), checked against the store's shape; returns it.

    Its gate keys are computed for the pages the store's sequences hold and kept up to date on
    append, in `key_dtype` (default: the KV dtype; bench/decode.py times float32 beside it).
    """
    c = store.config
    expect = {"num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
              "page_size": c.page_size}
    if not isinstance(gate, PageGate):
        gate = load_gate(gate, expect)
    check_gate_shape(gate.shape, expect, "given")
    gate = gate.to(c.device)
    with store.lock:
        cache = GateKeyCache(gate, store.pool.k_summary, key_dtype or c.dtype, weakref.WeakMethod(store.page_keys))
        old = _GATES.get(store)
        if old is not None:
            store.summary_listeners.remove(old[1].update)
        seq_ids = store.sequence_ids()
        for layer in range(c.num_layers):
            if seq_ids:
                csr = store.page_table(seq_ids, layer)
                fills = torch.full((len(csr.indices),), c.page_size, dtype=torch.long)
                ends, last = csr.indptr[1:].long().cpu(), csr.last_page_len.long().cpu()
                some = ends > csr.indptr[:-1].long().cpu()  # sequences holding a page
                fills[ends[some] - 1] = last[some]
                cache.update([layer], csr.indices.cpu(), csr.page_indexes().cpu(), fills.tolist())
        cached = store.allocator.cached_pages()  # free pages a prompt may still reuse (some found at start)
        if cached:
            pages, indexes = (torch.tensor(column) for column in zip(*cached))
            cache.update(list(range(c.num_layers)), pages, indexes, [c.page_size] * len(cached))
        store.summary_listeners.append(cache.update)
        _GATES[store] = (gate, cache)
    return gate


def gate_of(store, num_q_heads: int | None = None) -> PageGate:
    """The store's gate; GateMissing (FAILED_PRECONDITION) if it has none, GateFileInvalid for another group size."""
    held = _GATES.get(store)
    if held is None:
        raise GateMissing(f"method 'gate' needs a trained page gate and this store holds none: train one with "
                          f"`{TRAIN_COMMAND}`, then start the server with `kvcache serve --gate smollm2-135m` "
                          "(in-process: kvcache.methods.gate_store.attach_gate(store, name))")
    gate = held[0]
    if num_q_heads is not None and gate.shape.group * gate.shape.num_kv_heads != num_q_heads:
        raise GateFileInvalid(f"the store's gate is for {gate.shape.group * gate.shape.num_kv_heads} query heads; "
                              f"q has {num_q_heads}")
    return gate


def layer_gate_of(store, layer: int) -> LayerGate:
    """The store's gate for `layer` with its cached gate keys (what the attention methods take)."""
    gate = gate_of(store)
    return gate.layer(layer).with_keys(_GATES[store][1].layer(layer))


def attached_gate_keys(store) -> GateKeyCache | None:
    """The gate key cache of the store's gate, or None if it holds no gate."""
    held = _GATES.get(store)
    return None if held is None else held[1]


def gate_key_cache(store) -> GateKeyCache:
    """The gate key cache of the store's gate (GateMissing if it has none)."""
    gate_of(store)
    return _GATES[store][1]
