"""`kvcache serve` options: flags over a TOML file over defaults; JSON log lines."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from fractions import Fraction

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from typing import TYPE_CHECKING

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter, StoreFull
from kvcache.service.log_fields import LogFields

if TYPE_CHECKING:  # grpc is imported only by commands that serve
    from kvcache.service.server import ServerOptions

STORE_FLAGS = {  # flag dest -> KVCacheConfig field
    "layers": "num_layers", "kv_heads": "num_kv_heads", "head_dim": "head_dim", "page_size": "page_size",
    "dtype": "dtype", "device": "device", "pages": "device_pages", "host_pages": "host_pages",
    "disk_pages": "disk_pages", "disk_path": "disk_path", "pinned_tail_pages": "pinned_tail_pages",
    "eviction": "eviction", "verify_host_reads": "verify_host_reads", "disk_namespace": "disk_namespace",
}
SERVER_FLAGS = ("host", "port", "workers", "max_message_mb", "token_file", "tls_cert", "tls_key", "metrics_port",
                "grace_seconds", "torch_threads", "gate", "allocation", "cpus", "reject_nonfinite", "max_query_heads",
                "max_call_memory", "max_sequences_per_client", "max_pages_per_client", "local_plane", "share_pool",
                "step_lease_seconds")
STORE_DEFAULTS = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "page_size": 16, "dtype": "float32",
                  "device": "cpu"}
# The device pool when neither --pages nor --memory (nor the TOML's device_pages or memory) sizes it: 913 pages
# (14,608 positions) at the default shape. 4096 pages there would be 4.8 GB, preallocated at start.
DEFAULT_MEMORY = "1GiB"
# Size units of --memory: decimal (KB = 1000 bytes) and binary (KiB = 1024 bytes); no unit means bytes.
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache serve` (all default to None so a TOML file can fill them)."""
    p.add_argument("--config", help="TOML file with [store] (KVCacheConfig fields) and [server] tables")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one, logged at start)")
    p.add_argument("--workers", type=int, help="RPC threads (default 16)")
    p.add_argument("--max-message-mb", type=int, help="largest message accepted or sent (default 64)")
    p.add_argument("--token-file", help="file holding the bearer token every call must carry")
    p.add_argument("--tls-cert", help="PEM certificate chain (TLS on when given with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on http://host:PORT/metrics")
    p.add_argument("--grace-seconds", type=float, help="on SIGTERM, time in-flight calls get to finish (30)")
    p.add_argument("--reject-nonfinite", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse NaN or Inf in appended K/V and in q with INVALID_ARGUMENT (default on)")
    p.add_argument("--max-query-heads", type=int,
                   help="most query heads one attend may bring (default 16 per kv head): bounds a call's work")
    p.add_argument("--max-call-memory", metavar="SIZE",
                   help="working memory one attend may need, e.g. 512MiB (default: 256MiB plus the store's bytes); "
                   "a call estimated over it is refused with RESOURCE_EXHAUSTED before any work")
    p.add_argument("--max-sequences-per-client", type=int,
                   help="live sequences one client connection may hold (default 4096; 0: no cap)")
    p.add_argument("--max-pages-per-client", type=int,
                   help="pages one client connection's sequences may hold (default 0: no cap)")
    p.add_argument("--local-plane", action=argparse.BooleanOptionalAction, default=None,
                   help="offer clients on this host a Unix socket for their layer calls, a ticket from the "
                   "authenticated channel (default: on; docs/wire-protocol.md, \"Local data plane\")")
    p.add_argument("--share-pool", action=argparse.BooleanOptionalAction, default=None,
                   help="put the page pool in shared memory (CUDA IPC on a GPU): an engine on this host maps it over "
                   "the local data plane and runs each decode step's attention itself, leasing the step's pages from "
                   "the server (untiered stores; every engine given the pool can read all of it: "
                   "docs/wire-protocol.md, \"Shared pool\")")
    p.add_argument("--step-lease-seconds", type=float,
                   help="a decode step leased on the shared pool and not ended within this is aborted (default 10)")
    p.add_argument("--torch-threads", type=int,
                   help="intra-op threads of the CPU attention (default: torch's); "
                   "1 when engine and server share a few cores")
    p.add_argument("--cpus",
                   help="CPUs the server runs on, e.g. 2-3 or 4,6 (default: all); keep them apart from the engine's")
    p.add_argument("--gate", help="page-gate weights for method 'gate': a .safetensors path or a name under "
                   "kvcache/methods/gates/ (`kvcache train-gate` makes them); "
                   "without one, 'gate' gets FAILED_PRECONDITION")
    p.add_argument("--allocation", help="byte allocation for calls that ask for bytes=share: a .json path or a name "
                   "under kvcache/methods/allocations/ (`kvcache calibrate-bytes` makes them); without one, a budget "
                   "is spent alike in every layer")
    p.add_argument("--layers", type=int, help="model layers (default 30)")
    p.add_argument("--kv-heads", type=int, help="kv heads (default 3)")
    p.add_argument("--head-dim", type=int, help="head dim (default 64)")
    p.add_argument("--page-size", type=int, help="positions per page (default 16)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="K/V dtype (default float32)")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--pages", type=int, help="pages in the device pool (default: as many as --memory's default)")
    pool.add_argument("--memory", metavar="SIZE",
                      help=f"bytes of the device pool, e.g. 4GiB, 512MiB, 2GB or a number of bytes; turned into "
                      f"pages of this shape's bytes per page (default {DEFAULT_MEMORY}: 913 pages at the default "
                      f"shape). The pool is allocated at start")
    p.add_argument("--host-pages", type=int, help="K/V pages in pinned CPU memory (default 0: no host tier)")
    p.add_argument("--disk-pages", type=int, help="K/V pages in a file (default 0: no disk tier)")
    disk = p.add_mutually_exclusive_group()
    disk.add_argument("--disk-path", help="directory of the disk tier's file (default: the temp dir); the file is "
                      "gone when the server stops")
    disk.add_argument("--disk-dir", help="directory of a disk tier that outlives the server: prefix-cache pages "
                      "that reach it are served again, verified, after a restart (needs --disk-pages)")
    p.add_argument("--disk-namespace", help="with --disk-dir: the model whose K/V the directory holds (a name, a "
                   "checkpoint hash); files written under another are started afresh, never served (default: none)")
    p.add_argument("--pinned-tail-pages", type=int, help="last pages of each sequence kept on the device (2)")
    p.add_argument("--eviction", choices=["lru", "sparse"], help="which device pages go down first (default lru)")
    p.add_argument("--verify-host-reads", action=argparse.BooleanOptionalAction, default=None,
                   help="the GPU kernels check every pinned host row they read in place against its checksum "
                   "(default on; off saves 3%% of a dense and 12-16%% of a sparse offloaded step at 128K on an H100)")


def parse_cpus(text: str) -> list[int]:
    """CPU ids from a list like "0,2-3" (Linux cpuset syntax), sorted, each once; InvalidParameter if malformed."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            lo = int(first)
            hi = int(last) if dash else lo
            if lo < 0 or hi < lo:
                raise ValueError
            cpus.update(range(lo, hi + 1))
    except ValueError:
        raise InvalidParameter(f"--cpus {text!r}: expected CPU ids such as 0,2-3") from None
    return sorted(cpus)


def parse_size(text: str | int, source: str = "--memory") -> int:
    """Bytes from a size such as "4GiB", "512MiB", "2GB", "1.5GiB" or "1073741824" (or an int, from TOML);
    KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB powers of 1024, units in any case. InvalidParameter
    if malformed or not positive."""
    if isinstance(text, int) and not isinstance(text, bool):
        number, unit = Fraction(text), ""
    else:
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if match is None or match.group(2).lower() not in SIZE_UNITS:
            raise InvalidParameter(f"{source} {text!r}: expected a size such as 4GiB, 512MiB, 2GB or a number of "
                                   "bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        number, unit = Fraction(match.group(1)), match.group(2).lower()
    size = int(number * SIZE_UNITS[unit])
    if size < 1:
        raise InvalidParameter(f"{source} {text!r}: the size must be at least one byte")
    return size


def pages_for_memory(config: KVCacheConfig, size: int, source: str = "--memory") -> int:
    """Device pages that fit in `size` bytes at the shape and dtype of `config` (its device_pages is ignored):
    whole pages of config.page_bytes. InvalidParameter if not even one fits."""
    pages = size // config.page_bytes
    if pages < 1:
        raise InvalidParameter(
            f"{source}: {size:,} bytes is less than one page, which holds {config.page_bytes:,} bytes at "
            f"{config.num_layers} layers x {config.num_kv_heads} kv heads x {config.page_size} positions x "
            f"{config.head_dim} dims in {str(config.dtype).removeprefix('torch.')}")
    return pages


def format_bytes(size: int) -> str:
    """`size` in the largest binary unit that keeps it at least 1, e.g. "1.00 GiB"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def pin_process(cpus: list[int]) -> None:
    """Run this process's threads (those running now: importing grpc and torch starts some), and every thread
    they start later, on `cpus` only.

    Why: on the 2-core VM a streamed layer call added 0.79-0.95 ms over in-process with the engine and
    the server free to migrate, and 0.51-0.60 ms with each on a core of its own (bench/results/rpc_cpus_vm.json):
    a thread woken on the core the other process just used starts with cold caches. On Linux affinity is
    per thread, and a new thread inherits its creator's."""
    import os

    if not hasattr(os, "sched_setaffinity"):
        raise InvalidParameter("--cpus: this platform cannot pin a process to CPUs")
    try:
        os.sched_setaffinity(0, cpus)  # this thread first: a bad set fails here, before any other moved
        for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
            try:
                os.sched_setaffinity(int(task), cpus)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a TOML list holding other than ints
        raise InvalidParameter(f"--cpus {cpus}: {exc}") from None


def resolve(args: argparse.Namespace) -> tuple[KVCacheConfig, ServerOptions]:
    """KVCacheConfig and ServerOptions from defaults, then the TOML file, then the flags."""
    from kvcache.service.server import ServerOptions, share_pool_problem  # grpc: only commands that serve

    store, server = dict(STORE_DEFAULTS), {}
    memory, memory_source = None, "--memory"  # the device pool as bytes, when that is how it is sized
    if args.config:
        with open(args.config, "rb") as f:
            doc = tomllib.load(f)
        unknown = set(doc) - {"store", "server"}
        if unknown:
            raise InvalidParameter(f"{args.config}: unknown tables {sorted(unknown)}; expected [store], [server]")
        toml_store = dict(doc.get("store", {}))
        if "memory" in toml_store:
            if "device_pages" in toml_store:
                raise InvalidParameter(f"{args.config}: [store] gives both device_pages and memory; give one")
            memory, memory_source = toml_store.pop("memory"), f"{args.config}: [store] memory"
        store.update(toml_store)
        server.update(doc.get("server", {}))
    for dest, field in STORE_FLAGS.items():
        if getattr(args, dest) is not None:
            store[field] = getattr(args, dest)
    if getattr(args, "disk_dir", None):
        store.update(disk_path=args.disk_dir, disk_persistent=True)
    if args.pages is not None:  # the flag wins over a TOML memory
        memory = None
    if args.memory is not None:  # ... and --memory over a TOML device_pages (argparse refuses both flags)
        memory, memory_source = args.memory, "--memory"
        store.pop("device_pages", None)
    if memory is None and "device_pages" not in store:
        memory, memory_source = DEFAULT_MEMORY, f"--memory (default {DEFAULT_MEMORY})"
    for dest in SERVER_FLAGS:
        if getattr(args, dest) is not None:
            server[dest] = getattr(args, dest)
    if isinstance(server.get("cpus"), str):  # a flag, or TOML's "2-3" (TOML may also give [2, 3])
        server["cpus"] = parse_cpus(server["cpus"])
    token_file = server.pop("token_file", None)
    if token_file:
        with open(token_file) as f:
            server["token"] = f.read().strip()
        if not server["token"]:
            raise InvalidParameter(f"token file {token_file} is empty")
    if server.get("max_call_memory") is not None:
        server["max_call_memory"] = parse_size(server["max_call_memory"], "--max-call-memory")
    for cap in ("max_sequences_per_client", "max_pages_per_client"):
        if cap in server and (not isinstance(server[cap], int) or server[cap] < 0):
            raise InvalidParameter(f"--{cap.replace('_', '-')} {server[cap]!r}: expected a count (0: no cap)")
    if bool(server.get("tls_cert")) != bool(server.get("tls_key")):
        raise InvalidParameter("TLS needs both --tls-cert and --tls-key")
    try:
        if memory is not None:  # the shape's bytes per page, from a config of one page
            size = parse_size(memory, memory_source)
            store["device_pages"] = pages_for_memory(KVCacheConfig(**{**store, "device_pages": 1}), size,
                                                     memory_source)
        config, options = KVCacheConfig(**store), ServerOptions(**server)
    except TypeError as exc:
        raise InvalidParameter(f"bad configuration key: {exc}") from None
    share_pool_problem(config, options)
    return config, options


class JsonLines(logging.Formatter):
    """One JSON object per log line: time, level, logger, and the message's own fields."""

    _stamp = (-1, "")  # (a second since the epoch, its "ts"): a server writes many lines a second

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        line = {"ts": self._stamp[1], "level": record.levelname, "logger": record.name}
        if isinstance(record.msg, LogFields) and not record.args:
            line.update(record.msg)  # the fields as logged: no JSON text to parse back
        else:
            message = record.getMessage()
            try:
                fields = json.loads(message)
                line.update(fields if isinstance(fields, dict) else {"msg": message})
            except ValueError:
                line["msg"] = message
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def one_malloc_arena() -> bool:
    """Make glibc serve every thread of this process from one malloc arena; True if it took effect.

    Each RPC thread otherwise gets an arena of its own, whose heaps are capped at 64 MB, so the
    tens of MB of temporaries a CPU attention over a long context allocates came from fresh mmaps
    (page faults, zeroing) on some threads and not on others: at 32K on the 2-core VM one attend
    stream took 42 ms per call and another 25 ms, same server and sequence; with one arena both
    took 23 ms. Call it before the server starts its threads."""
    import ctypes
    import ctypes.util

    M_ARENA_MAX = -8  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc: nothing to set
        return False


def preallocation_line(config: KVCacheConfig) -> str:
    """The stderr line `kvcache serve` writes before it allocates the store: pages, bytes, device, tiers."""
    c = config
    line = (f"kvcache serve: allocating {c.device_pages:,} pages of {c.page_bytes:,} bytes "
            f"({format_bytes(c.device_pages * c.page_bytes)}, {c.device_pages * c.page_size:,} positions; "
            f"{c.num_layers} layers x {c.num_kv_heads} kv heads x {c.page_size} positions x {c.head_dim} dims, "
            f"{str(c.dtype).removeprefix('torch.')}) on {c.device}")
    if c.tiered:
        line += (f", with the dim-major keys and summaries of {c.host_pages + c.disk_pages:,} lower-tier pages; "
                 f"{c.host_pages:,} pages in pinned host memory, {c.disk_pages:,} in a file")
    return line


def allocated_line(store, seconds: float) -> str:
    """The stderr line `kvcache serve` writes once the store is allocated: the bytes each place holds."""
    from kvcache.store.tiers import DISK, HOST

    pool = store.pool
    device = sum(t.numel() * t.element_size() for t in (pool.k_seq, pool.k_dim, pool.v_seq, pool.k_summary))
    line = f"kvcache serve: allocated {format_bytes(device)} on {store.config.device}"
    if store.tiers is not None:
        for tier, name in ((HOST, "pinned host memory"), (DISK, "the disk file")):
            storage = store.tiers.storage.get(tier)
            if storage is not None:
                line += f", {format_bytes(storage.data.numel() * storage.data.element_size())} in {name}"
    return line + f" in {seconds:.2f} s"


def serve(config: KVCacheConfig, options: ServerOptions) -> None:
    """Allocate the store (a stderr line before and after), serve until SIGTERM or SIGINT, then drain and stop."""
    from kvcache.service.server import Server, run_server
    from kvcache.store.tiers import DISK

    print(preallocation_line(config), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        server = Server(config, options)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one; so is the CPU allocator's "can't allocate memory"
        if "alloc" not in str(exc).lower():
            raise
        raise StoreFull(f"cannot allocate the store ({exc}); lower --memory or --pages") from None
    store = server.servicer.client.store
    print(allocated_line(store, time.perf_counter() - t0), file=sys.stderr, flush=True)
    if config.disk_persistent:
        files = store.tiers.storage[DISK].files
        found = "started afresh: " + files.fresh_reason if files.fresh_reason else "found its files"
        print(f"kvcache serve: the disk tier in {config.disk_path} {found}; {store.pages_restored} prefix pages "
              f"restored, {store.pages_dropped_at_start} dropped", file=sys.stderr, flush=True)
    run_server(server)


def main(args: argparse.Namespace) -> int:
    """Run `kvcache serve` until SIGTERM; returns the exit code."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.raiseExceptions = False  # a closed stdout (the parent went away) must not disturb the drain
    try:
        config, options = resolve(args)
    except (InvalidParameter, OSError) as exc:
        print(f"kvcache serve: {exc}", file=sys.stderr)
        return 2
    one_malloc_arena()
    if options.cpus:
        try:
            pin_process(options.cpus)
        except InvalidParameter as exc:
            print(f"kvcache serve: {exc}", file=sys.stderr)
            return 2
    if options.torch_threads:
        import torch

        torch.set_num_threads(options.torch_threads)
    from kvcache.errors import AllocationInvalid, GateFileInvalid, GateMissing

    try:
        serve(config, options)
    except (GateMissing, GateFileInvalid, AllocationInvalid, InvalidParameter, StoreFull) as exc:
        print(f"kvcache serve: {exc}", file=sys.stderr)
        return 2
    return 0
