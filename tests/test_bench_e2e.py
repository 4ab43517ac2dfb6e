"""`kvcache bench e2e` on the CPU with a tiny model: every method on every kvcache path (in process, and through a
`kvcache serve` on its shared pool, over its local data plane and over gRPC) and the static-cache baseline give a
row, with the bytes a step reads and what they predict against dense."""

from __future__ import annotations

import torch

from kvcache.bench.e2e import run


def test_every_method_and_path_gives_a_row_with_its_bytes_and_bound():
    report = run([("tiny", 64, 2)], ["dense", "sparq", "quest", "window", "gate"], steps=2, device=torch.device("cpu"))
    rows = report["rows"]
    paths = {(r["method"], r["path"]) for r in rows}
    assert paths == {("dense", "static-eager")} | {(m, p) for m in ("dense", "sparq", "quest", "window")
                                                   for p in ("planned", "per-call", "remote-pool", "remote-local",
                                                             "remote-grpc")} | {
                         ("gate", "planned"), ("gate", "per-call")}  # the remote paths' server holds no gate
    by = {(r["method"], r["path"]): r for r in rows}
    assert by[("sparq", "planned")]["attention_bytes_per_step"] < by[("dense", "planned")]["attention_bytes_per_step"]
    assert by[("sparq", "planned")]["bound_vs_dense"] > 1.0
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    remote = by[("sparq", "remote-local")]
    assert by[("sparq", "remote-pool")]["attention_bytes_per_step"] == remote["attention_bytes_per_step"]
    assert remote["attention_bytes_per_step"] == by[("sparq", "planned")]["attention_bytes_per_step"]
