"""`kvcache bench all`: one run writes the report docs/methods.md's headline table is rendered from."""

import json

from kvcache.cli import main


def test_bench_all_on_the_cpu_times_every_servable_method_and_writes_its_report(tmp_path):
    out = tmp_path / "headline.json"
    assert main(["bench", "all", "--device", "cpu", "--context", "256", "--iters", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["context"] == 256 and "prefill" not in report  # the prefill kernel is timed on a GPU only
    methods = {r["method"] for r in report["decode"]["rows"]}
    assert {"sdpa_contiguous", "dense", "sparq", "quest", "gate", "window"} <= methods
    assert all(r["bytes_read"] > 0 and r["time_us"] > 0 for r in report["decode"]["rows"])
    assert report["device"] and report["torch"] and report["command"]
