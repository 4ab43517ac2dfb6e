"""A `kvcache serve` subprocess for the benchmarks that need a real server: started on a free port, its log in a
file, stopped with SIGTERM (a drain) or killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    """`python -m kvcache.cli serve --port 0 <flags>`, its stdout and stderr appended to `log_path`."""

    def __init__(self, flags: list[str] | tuple[str, ...], log_path: str, timeout: float = 120.0) -> None:
        self.log = open(log_path, "a")  # noqa: SIM115 (closed in stop)
        args = [sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", *flags]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = None
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            self.log.write(line)
            if '"event": "listening"' in line:
                self.port = json.loads(line)["port"]
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            self.process.kill()
            raise RuntimeError(f"kvcache serve did not start; see {log_path}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)

    @property
    def target(self) -> str:
        """"127.0.0.1:PORT" for a RemoteClient."""
        return f"127.0.0.1:{self.port}"

    def stop(self, kill: bool = False) -> int:
        """SIGTERM (drain and stop) or SIGKILL; returns the exit code."""
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.flush()
        self.log.close()
        return code
