"""Helpers for the service tests: run `kvcache serve` as a subprocess on a free loopback port.

    server = start_server("--max-message-mb", "1")
    try:
        client = RemoteClient(server.target)
        ...
    finally:
        server.stop()

or `with serving(...) as server: ...`. The server's stdout (JSON log lines) and stderr are read
on a background thread from the start, so the pipe never fills; `server.output()` has them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kvcache.config import KVCacheConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The small store every service test uses unless it says otherwise; STORE_CONFIG is the same
# store as a KVCacheConfig, for an InProcessClient that must match the server.
STORE = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "page_size": 4, "dtype": "float32", "device_pages": 256}
DEFAULT_STORE_FLAGS: tuple[str, ...] = (
    "--layers", str(STORE["num_layers"]), "--kv-heads", str(STORE["num_kv_heads"]),
    "--head-dim", str(STORE["head_dim"]), "--page-size", str(STORE["page_size"]),
    "--pages", str(STORE["device_pages"]), "--dtype", STORE["dtype"],
)


def store_config(**overrides) -> KVCacheConfig:
    """The KVCacheConfig of a server started with DEFAULT_STORE_FLAGS (fields may be overridden)."""
    return KVCacheConfig(**{**STORE, "device": "cpu", **overrides})


@contextlib.contextmanager
def running_server(**options) -> Iterator:
    """An in-process `kvcache serve` (kvcache.service.server.Server) over store_config() on a free loopback port,
    with 4 workers and ServerOptions `options`; drained and stopped on exit."""
    from kvcache.service.server import Server, ServerOptions  # grpc only for the tests that serve

    server = Server(store_config(), ServerOptions(**{"port": 0, "workers": 4, "grace_seconds": 5, **options}))
    server.start()
    try:
        yield server
    finally:
        if not server.draining.is_set():
            server.drain_and_stop()


class ServerProcess:
    """A running `kvcache serve` subprocess: its port, its log lines, and a way to stop it."""

    def __init__(self, process: subprocess.Popen, args: list[str]) -> None:
        self.process = process
        self.args = args
        self.port: int | None = None
        self.listening: dict = {}
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True, name="kvcache-serve-stdout")
        self._reader.start()

    @property
    def target(self) -> str:
        """"127.0.0.1:PORT", for grpc channels and RemoteClient."""
        return f"127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)  # end of output: the process closed stdout (it is exiting)

    def wait_listening(self, timeout: float) -> None:
        """Block until the "listening" log line; fail with the server's output if it dies or is slow."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise RuntimeError(f"kvcache serve did not log 'listening' within {timeout} s\n{self._report()}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait(timeout=5)
                raise RuntimeError(f"kvcache serve exited with {self.process.returncode} before listening\n"
                                   f"{self._report()}")
            event = _json(line)
            if event.get("event") == "listening":
                self.listening = event
                self.port = int(event["port"])
                return

    def _caught_up(self) -> None:
        # Once the process has exited, its last lines may still sit in the pipe: under load (a log
        # line per call) the reader thread lags, and a check of the final events raced it.
        if self.process.poll() is not None:
            self._reader.join(timeout=30)

    def output(self) -> str:
        """Everything the server wrote so far (stdout and stderr); all of it once the process has exited."""
        self._caught_up()
        with self._lock:
            return "\n".join(self._lines)

    def events(self) -> list[dict]:
        """The JSON log lines written so far, parsed; all of them once the process has exited."""
        self._caught_up()
        with self._lock:
            lines = list(self._lines)
        return [e for e in map(_json, lines) if e]

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` (if still running) and wait up to `timeout` s; returns the exit code.

        If it has not exited by then it is killed and RuntimeError says so (with its output).
        """
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"kvcache serve did not exit within {timeout} s of signal {sig}\n"
                                   f"{self._report()}") from None
        self._reader.join(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)

    def _report(self) -> str:
        return f"command: {' '.join(self.args)}\n--- output ---\n{self.output()}"


def _json(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def start_server(
    *flags: str,
    env: dict[str, str] | None = None,
    store_flags: tuple[str, ...] = DEFAULT_STORE_FLAGS,
    timeout: float = 40.0,
    launcher: tuple[str, ...] = ("-m", "kvcache.cli"),
) -> ServerProcess:
    """Start `python -m kvcache.cli serve --port 0 <store_flags> <flags>` and wait until it listens.

    Later flags win over earlier ones; pass store_flags=() when a --config file must set the store.
    `launcher` replaces `-m kvcache.cli` (e.g. ("-c", script), the script calling kvcache.cli.main).
    """
    args = [sys.executable, *launcher, "serve", "--port", "0", *store_flags, *flags]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                               env=full_env)
    server = ServerProcess(process, args)
    try:
        server.wait_listening(timeout)
    except BaseException:
        server.kill()
        raise
    return server


def start_servers(specs: dict[str, tuple[tuple[str, ...], dict]], parallel: int = 3) -> dict[str, ServerProcess]:
    """Start several servers ({name: (flags, start_server keywords)}), `parallel` at a time: each start
    is mostly importing torch, so a few together take less time than one after another (on 2 cores,
    more than ~4 at once thrash and take far longer)."""
    results: dict[str, ServerProcess | BaseException] = {}
    slots = threading.Semaphore(parallel)

    def start(name: str) -> None:
        flags, kwargs = specs[name]
        with slots:
            try:
                results[name] = start_server(*flags, **kwargs)
            except BaseException as exc:  # re-raised below, once every start has finished
                results[name] = exc

    threads = [threading.Thread(target=start, args=(name,)) for name in specs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    failed = [r for r in results.values() if isinstance(r, BaseException)]
    if failed:
        stop_servers([r for r in results.values() if isinstance(r, ServerProcess)])
        raise failed[0]
    return results  # type: ignore[return-value]


def stop_servers(servers: list[ServerProcess]) -> list[int]:
    """Stop several servers at once (SIGTERM, then kill); returns their exit codes."""
    codes: list[int] = [0] * len(servers)

    def stop(i: int) -> None:
        try:
            codes[i] = servers[i].stop()
        finally:
            servers[i].kill()

    threads = [threading.Thread(target=stop, args=(i,)) for i in range(len(servers))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return codes


@contextlib.contextmanager
def serving(*flags: str, **kwargs) -> Iterator[ServerProcess]:
    """start_server(...) for the body of a with-block; stopped (SIGTERM, then kill) on the way out."""
    server = start_server(*flags, **kwargs)
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.kill()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Torch ops of a test on one thread (servers and ranks run beside it on two cores); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def in_process_shards(n: int):
    """A ShardedClient over n in-process stores of the service tests' small store."""
    from kvcache import InProcessClient
    from kvcache.clients.sharded import ShardedClient

    return ShardedClient([InProcessClient(store_config()) for _ in range(n)])
