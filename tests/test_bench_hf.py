"""`kvcache bench hf` on the CPU with a tiny random Llama: transformers' own cache, the kvcache cache and the engine
each give a row per method with positive times, SparQ reads less than dense, and the kvcache cache reads what the
engine reads at the same settings."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers loads: nothing may reach the hub

import torch

from kvcache.bench.hf import run


def test_every_cache_and_method_gives_a_row_and_the_kvcache_cache_reads_what_the_engine_reads():
    report = run("tiny", [64], [2], steps=2, device=torch.device("cpu"))
    rows = report["rows"]
    by = {(r["cache"], r["method"]): r for r in rows}
    assert set(by) == {("transformers", "dense"), ("kvcache", "dense"), ("kvcache", "sparq"), ("engine", "dense"),
                       ("engine", "sparq")}
    assert len(rows) == len(by)
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["attention_bytes_per_token"] > 0 for r in rows)
    for cache in ("kvcache", "engine"):
        assert by[(cache, "sparq")]["attention_bytes_per_token"] < by[(cache, "dense")]["attention_bytes_per_token"]
    for method in ("dense", "sparq"):
        ours, engine = by[("kvcache", method)], by[("engine", method)]
        assert ours["attention_bytes_per_token"] == engine["attention_bytes_per_token"]
        assert ours["overhead_ms_per_step"] == ours["ms_per_step"] - engine["ms_per_step"]
    # The kvcache cache's SparQ steps ran SparQ (not dense because of too short a sequence).
    assert by[("kvcache", "sparq")]["steps_by_method"] == {"dense": 3, "sparq": 3}
    assert by[("kvcache", "sparq")]["params"]["k"] == 64 // 16
