"""grpc core settings that kvcache's server and client processes apply before grpc is first imported."""

from __future__ import annotations

import os
import sys

# grpc core's EventEngine TCP client and listener (on by default since grpcio 1.6x) hand each
# socket read to a pool thread before the completion queue sees it: one more thread wake-up per
# message each way; the older iomgr path reads on the polling thread. On the H200 host, what a
# streamed layer call of a SmolLM2-shaped decode step adds over in-process went from 1.206 to
# 1.077 ms with these off (bench/results/rpc_h200_cuda_event_engine_ab.json).
LOW_LATENCY_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def prefer_low_latency_core() -> bool:
    """Turn grpc core's EventEngine TCP client and listener off for this process; True if applied.

    grpc reads GRPC_EXPERIMENTS once, when it is first imported, so this must run before that; it
    does nothing once grpc is loaded, or when GRPC_EXPERIMENTS is already set (even empty: set it to
    keep grpc's own defaults). Child processes inherit the setting."""
    if "grpc" in sys.modules or "GRPC_EXPERIMENTS" in os.environ:
        return False
    os.environ["GRPC_EXPERIMENTS"] = LOW_LATENCY_EXPERIMENTS
    return True
