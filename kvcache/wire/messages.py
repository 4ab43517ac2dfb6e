"""Conversions between wire messages and the Python values of the KVCacheClient protocol."""

from __future__ import annotations

from typing import Any

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.stats import coverage_entry
from kvcache.store import SequenceInfo
from kvcache.wire import kvcache_pb2 as pb


def info_to_wire(info: SequenceInfo) -> pb.SequenceInfo:
    """SequenceInfo -> message."""
    return pb.SequenceInfo(seq_id=info.seq_id, lengths=list(info.lengths), num_pages=info.num_pages,
                           cached_tokens=info.cached_tokens)


def info_from_wire(msg: pb.SequenceInfo) -> SequenceInfo:
    """Message -> SequenceInfo."""
    return SequenceInfo(msg.seq_id, tuple(msg.lengths), msg.num_pages, msg.cached_tokens)


def params_to_wire(params: dict[str, Any] | None) -> dict[str, pb.ParamValue]:
    """Method parameters (ints, floats, bools) -> map of ParamValue."""
    out = {}
    for name, value in (params or {}).items():
        if isinstance(value, bool):
            out[name] = pb.ParamValue(bool_value=value)
        elif isinstance(value, int):
            out[name] = pb.ParamValue(int_value=value)
        elif isinstance(value, float):
            out[name] = pb.ParamValue(float_value=value)
        else:
            raise InvalidParameter(f"parameter {name}={value!r}: only int, float and bool travel")
    return out


def params_from_wire(params) -> dict[str, Any]:
    """Map of ParamValue -> method parameters; an unset value is an InvalidParameter."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            raise InvalidParameter(f"parameter {name!r} has no value")
        out[name] = getattr(value, kind)
    return out


def config_to_wire(c: KVCacheConfig) -> pb.StoreConfig:
    """KVCacheConfig -> message (dtype by name)."""
    return pb.StoreConfig(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                          page_size=c.page_size, dtype=str(c.dtype).removeprefix("torch."), device=str(c.device),
                          device_pages=c.device_pages, host_pages=c.host_pages, disk_pages=c.disk_pages)


def config_from_wire(m: pb.StoreConfig, device: str = "cpu") -> KVCacheConfig:
    """Message -> KVCacheConfig on `device` (the server's device means nothing to a client)."""
    return KVCacheConfig(num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                         page_size=m.page_size, dtype=m.dtype, device=device, device_pages=m.device_pages,
                         host_pages=m.host_pages, disk_pages=m.disk_pages)


def coverage_to_wire(snapshot: dict[str, dict[int, dict]]) -> list[pb.CoverageStats]:
    """A coverage snapshot (kvcache.stats.CoverageTotals.snapshot) -> CoverageStats messages."""
    return [pb.CoverageStats(method=method, layer=layer, count=e["count"], sum=e["sum"], fallbacks=e["fallbacks"],
                             bounds=[float(b) for b in e["buckets"]], cumulative=list(e["buckets"].values()))
            for method, layers in snapshot.items() for layer, e in layers.items()]


def coverage_from_wire(messages) -> dict[str, dict[int, dict]]:
    """CoverageStats messages -> a coverage snapshot, as kvcache.stats.CoverageTotals.snapshot gives it."""
    out: dict[str, dict[int, dict]] = {}
    for m in messages:
        buckets = {str(b): n for b, n in zip(m.bounds, m.cumulative)}
        out.setdefault(m.method, {})[m.layer] = coverage_entry(m.count, m.sum, m.fallbacks, buckets)
    return out


def cuda_handle_to_wire(handle: tuple) -> pb.CudaHandle:
    """A CudaHandle from torch's UntypedStorage._share_cuda_() tuple."""
    device, ipc, size, offset, counter, counter_offset, event, sync = handle
    return pb.CudaHandle(device=device, handle=ipc, size_bytes=size, offset_bytes=offset, ref_counter_handle=counter,
                         ref_counter_offset=counter_offset, event_handle=event or b"", event_sync_required=sync)


def cuda_handle_from_wire(m: pb.CudaHandle) -> tuple:
    """The arguments of torch.UntypedStorage._new_shared_cuda for a CudaHandle."""
    return (m.device, m.handle, m.size_bytes, m.offset_bytes, m.ref_counter_handle, m.ref_counter_offset,
            m.event_handle, m.event_sync_required)
