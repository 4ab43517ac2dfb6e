"""A phase-1 rank of Star Attention, started by `torchrun` (kvcache.engine.star.encode_context_torchrun writes the
plan).

    torchrun --standalone --nproc-per-node N -m kvcache.engine.star_worker PLAN.json

Rank r (torch.distributed, gloo) loads the saved model, encodes the blocks of shard r
(StarPlan.shard_blocks()[r], each after the anchor) and appends their K/V to sub-sequence
sub_ids[r] on endpoints[r], its own server. Phase 1 needs no communication, so the process group
only gathers the ranks' reports (positions, seconds, error) to rank 0, which writes them to the
plan's "result" file. Every rank reaches the gather, even one that failed, so an error is reported
and never left hanging.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch
import torch.distributed as dist


def run_rank(plan: dict, rank: int, world: int) -> dict:
    """Encode and append this rank's blocks; the rank's report."""
    from kvcache.clients.remote import RemoteClient
    from kvcache.engine.star import StarPlan, load_saved_model, write_blocks

    if world != len(plan["endpoints"]):
        raise ValueError(f"{world} ranks for {len(plan['endpoints'])} shards: start one rank per shard")
    torch.set_num_threads(int(plan["threads"]))
    t0 = time.perf_counter()
    model = load_saved_model(plan["model"])
    load_seconds = time.perf_counter() - t0
    star = StarPlan(**plan["plan"])
    token = None
    if plan.get("token_file"):
        with open(plan["token_file"]) as f:
            token = f.read().strip()
    with RemoteClient(plan["endpoints"][rank], token=token) as client:
        report = write_blocks(model, client, plan["sub_ids"][rank], plan["context_ids"], star.shard_blocks()[rank],
                              star.anchor_size, plan["chunk_size"])
    return {**report, "load_seconds": load_seconds}


def main(argv: list[str] | None = None) -> int:
    """Entry point of each rank; returns 0 when every rank succeeded."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        plan = json.load(f)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "error": None}
    try:
        report.update(run_rank(plan, rank, world))
    except Exception as exc:  # noqa: BLE001 (reported through the gather below, so no rank waits forever)
        report["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(plan["result"], "w") as f:
            json.dump(reports, f)
    dist.destroy_process_group()
    return 0 if all(r["error"] is None for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
