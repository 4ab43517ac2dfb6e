"""Giving freed heap memory back to the OS once the server has grown well past its size at start.

glibc keeps freed blocks for reuse; after a burst of large requests (a 60 MB message decoded a few times over, say,
then refused) a server held hundreds of MB it no longer used, for as long as it ran. The server calls
`HeapTrimmer.check` from its housekeeping thread: past `slack` bytes above the baseline it calls malloc_trim, at
most once a second, so an ordinary load (whose temporaries stay within the slack) never pays for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time


def resident_bytes() -> int:
    """This process's anonymous resident memory in bytes (0 where /proc is not available): the heap's, not the
    pages of mapped files (the disk tier's file counts in VmRSS once touched, and no trim gives it back)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class HeapTrimmer:
    """Trims the heap when resident memory passes baseline + slack bytes (baseline: at construction)."""

    def __init__(self, slack: int) -> None:
        self.slack = slack
        self.baseline = resident_bytes()
        self.trims = 0
        self._trim = _malloc_trim()
        self._last = 0.0

    def check(self) -> bool:
        """Trim if the process has grown past the slack and no trim ran in the last second; True if it trimmed."""
        if self._trim is None or not self.baseline or time.monotonic() - self._last < 1.0:
            return False
        if resident_bytes() <= self.baseline + self.slack:
            return False
        self._trim(0)
        self._last = time.monotonic()
        self.trims += 1
        # What a trim could not give back is in use: measure growth from there, so a server that has grown for
        # good (more sequences, say) is not trimmed every second.
        self.baseline = max(self.baseline, resident_bytes() - self.slack // 2)
        return True
