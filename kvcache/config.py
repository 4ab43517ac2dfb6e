"""KVCacheConfig: the one source of truth for page size, dtypes, layouts and capacities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.errors import InvalidParameter

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Summaries (page min/max/mean) and value sums are kept in float32: a running mean
# in bf16 drifts, and both are small (3d per page, d per sequence and head).
SUMMARY_DTYPE = torch.float32


@dataclass(frozen=True)
class KVCacheConfig:
    """Shape, dtype and capacity of a KV store; validated on construction."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: torch.dtype | str = torch.float16
    device: torch.device | str = "cpu"
    device_pages: int = 1024  # K/V pages held on the device
    host_pages: int = 0  # K/V pages in pinned CPU memory (0: no host tier)
    disk_pages: int = 0  # K/V pages in a file (0: no disk tier)
    disk_path: str | None = None  # directory of the disk tier's file (default: the system's temp dir)
    disk_persistent: bool = False  # the disk tier's files stay in disk_path: prefix pages survive a restart
    disk_namespace: str = ""  # the model a persistent disk tier holds K/V of: files of another are started afresh
    verify_host_reads: bool = True  # the Triton kernels check each pinned host row they read against its checksum
    pinned_tail_pages: int = 2  # last pages of every live sequence kept on the device (the local window)
    eviction: str = "lru"  # "lru", or "sparse": pages sparse attention rarely chooses go down first

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            if self.dtype not in _DTYPES:
                raise InvalidParameter(f"dtype {self.dtype!r} unsupported; expected one of {sorted(_DTYPES)}")
            object.__setattr__(self, "dtype", _DTYPES[self.dtype])
        if self.dtype not in _DTYPES.values():
            raise InvalidParameter(f"dtype {self.dtype} unsupported; expected float32, float16 or bfloat16")
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except (RuntimeError, TypeError) as exc:
            raise InvalidParameter(f"device {self.device!r} is not a torch device: {exc}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParameter(f"device {self.device} requested, but CUDA is not available on this machine")
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "device_pages", "pinned_tail_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameter(f"{name} must be a positive int, got {value!r}")
        for name in ("host_pages", "disk_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidParameter(f"{name} must be a non-negative int, got {value!r}")
        if self.eviction not in ("lru", "sparse"):
            raise InvalidParameter(f"eviction {self.eviction!r} unknown; expected 'lru' or 'sparse'")
        if self.disk_path is not None and not isinstance(self.disk_path, str):
            raise InvalidParameter(f"disk_path must be a str (a directory), got {type(self.disk_path).__name__}")
        if not isinstance(self.disk_namespace, str):
            raise InvalidParameter(f"disk_namespace must be a str, got {type(self.disk_namespace).__name__}")
        if self.disk_persistent and not (self.disk_pages and self.disk_path):
            raise InvalidParameter("a persistent disk tier needs disk_pages > 0 and disk_path (its directory)")
        if self.head_dim % 8:
            raise InvalidParameter(f"head_dim must be a multiple of 8, got {self.head_dim}")

    @property
    def tiered(self) -> bool:
        """Whether K/V pages may leave the device (a host or disk tier exists)."""
        return self.host_pages > 0 or self.disk_pages > 0

    @property
    def total_pages(self) -> int:
        """Page ids the store hands out: one per K/V page slot over all tiers.

        Placement policy (docs/tiers.md): `k_dim` and the summaries of every page stay on the
        device, indexed by page id, so SparQ stage 1 and page scoring never leave it; only `k_seq`
        and `v_seq` move between tiers.
        """
        return self.device_pages + self.host_pages + self.disk_pages

    @property
    def itemsize(self) -> int:
        """Bytes per K or V element."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_bytes(self) -> int:
        """Bytes one page id holds across all layers: k_seq + k_dim + v_seq + summaries."""
        kv = 3 * self.num_kv_heads * self.page_size * self.head_dim * self.itemsize
        summary = self.num_kv_heads * 3 * self.head_dim * SUMMARY_DTYPE.itemsize
        return self.num_layers * (kv + summary)

    def pages_for(self, num_tokens: int) -> int:
        """Number of pages needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.page_size)
