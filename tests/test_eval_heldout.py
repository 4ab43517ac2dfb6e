"""`kvcache eval` on held-out text: the calibration and evaluation texts, the bootstrap statistics over windows, and
the harness end to end on a tiny random model (windows, intervals, the StreamingLLM floor, JSON and plot)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_support import use_model

from kvcache.engine import eval_stats
from kvcache.engine.config import ModelConfig
from kvcache.engine.eval_data import (
    CALIBRATION_SOURCE,
    EVALUATION_SOURCE,
    calibration_text,
    evaluation_text,
)
from kvcache.engine.model import random_model

CONFIG = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=1000.0, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def texts() -> tuple[str, str]:
    """The calibration and evaluation texts, built once (about a second: the stdlib's sources parsed)."""
    return calibration_text(), evaluation_text()


def shared_passages(text: str, other: str, starts: list[int], span: int = 4000) -> list[str]:
    """Pieces of 100 characters, at multiples of 100 in `span` characters from each of `starts`, found in `other`:
    every 200-character passage the two share holds one."""
    return [text[i : i + 100] for s in starts for i in range(s, min(s + span, len(text)) - 99, 100)
            if text[i : i + 100] in other]


# ---- the texts -----------------------------------------------------------------------------------------------


def test_the_evaluation_text_shares_no_long_passage_with_the_calibration_text(texts):
    calibration, evaluation = texts
    assert len(evaluation) > 1_000_000  # 16 windows of 8K tokens at 4 characters a token take 524 KB
    starts = [j * (len(evaluation) // 16) for j in range(16)]
    assert shared_passages(evaluation, calibration, starts) == []
    planted = evaluation[:1050] + calibration[200_000:200_200] + evaluation[1050:2000]
    assert shared_passages(planted, calibration, [0])  # the check finds a planted passage wherever it starts
    assert CALIBRATION_SOURCE != EVALUATION_SOURCE
    assert "pydoc_data" not in evaluation  # the calibration text's module is not walked


def test_the_evaluation_text_is_the_same_on_every_build(texts):
    first = texts[1]
    assert evaluation_text() is first  # built once per process
    assert evaluation_text.__wrapped__() == first  # and built again, the same text


# ---- the statistics ------------------------------------------------------------------------------------------


def windows_of(n: int, seed: int, tokens: int = 63) -> tuple[list[float], list[float], list[int]]:
    """Summed nll (nats) of a method and of dense over `n` windows of `tokens` scored tokens: dense's loss varies
    from window to window, the method's follows it, 2% worse per token plus noise."""
    gen = torch.Generator().manual_seed(seed)
    dense = (2.0 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)) * tokens
    method = dense + tokens * (0.02 + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64))
    return method.tolist(), dense.tolist(), [tokens] * n


def test_the_interval_holds_the_estimate_and_narrows_with_more_windows():
    widths = {}
    for n in (4, 64):
        method, dense, tokens = windows_of(n, seed=n)
        r = eval_stats.perplexity_ratio(method, dense, tokens)
        assert r.low <= r.point <= r.high and r.low < r.high
        assert r.point == pytest.approx(math.exp((sum(method) - sum(dense)) / sum(tokens)), rel=1e-12)
        widths[n] = r.high - r.low
    assert widths[64] < 0.6 * widths[4]  # about 1/sqrt(16) of it


def test_windows_that_agree_give_the_interval_of_their_value():
    r = eval_stats.perplexity_ratio([1.7 * 63] * 5, [1.5 * 63] * 5, [63] * 5)
    assert r.low == r.point == r.high == pytest.approx(math.exp(0.2))
    a = eval_stats.agreement([40] * 5, [63] * 5)
    assert a.low == a.point == a.high == 40 / 63


def test_resampling_is_paired_across_methods():
    method, dense, tokens = windows_of(16, seed=1)
    same = eval_stats.perplexity_ratio(dense, dense, tokens)
    assert (same.point, same.low, same.high) == (1.0, 1.0, 1.0)  # dense against itself, whatever the windows
    shifted = [d + 0.1 * n for d, n in zip(dense, tokens)]  # 0.1 nats a token worse on every window
    r = eval_stats.perplexity_ratio(shifted, dense, tokens)
    assert r.point == pytest.approx(math.exp(0.1)) and r.high - r.low < 1e-9  # unpaired, dense's spread would show
    alone = eval_stats.pooled_interval(shifted, [float(n) for n in tokens])
    assert alone.high - alone.low > 0.05


def test_top1_agreement_of_dense_with_itself_is_one():
    argmax = torch.randint(0, 101, (63,), generator=torch.Generator().manual_seed(0))
    assert eval_stats.top1_matches(argmax, argmax) == 63
    a = eval_stats.agreement([63, 63, 63], [63, 63, 63])
    assert (a.point, a.low, a.high) == (1.0, 1.0, 1.0)


def test_window_ratios_spread_and_verdict():
    ratios = eval_stats.window_ratios([2.0 * 10, 3.0 * 10], [1.0 * 10, 1.0 * 10], [10, 10])
    assert ratios == pytest.approx([math.e, math.e**2])
    assert eval_stats.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    bounds = [(-0.2, -0.3, -0.1), (0.2, 0.1, 0.3), (0.0, -0.1, 0.1)]
    assert [eval_stats.verdict(eval_stats.Interval(*b)) for b in bounds] == ["better", "worse", "tie"]
    assert eval_stats.resample(5, 10, seed=3).tolist() == eval_stats.resample(5, 10, seed=3).tolist()


# ---- windows and the floor -----------------------------------------------------------------------------------


def test_held_out_windows_are_disjoint_and_spread_over_the_text():
    from kvcache.engine.eval_cli import window_starts

    assert window_starts(10_000, [100, 50], 4, 0, disjoint=True) == {100: [0, 2500, 5000, 7500],
                                                                    50: [0, 2500, 5000, 7500]}
    assert window_starts(10_000, [100], 3, 0) == {100: [0, 100, 200]}  # without: a context apart, as before
    with pytest.raises(ValueError, match="disjoint"):
        window_starts(10_000, [100], 3, 50, disjoint=True)
    with pytest.raises(ValueError, match="passes the end of the text"):
        window_starts(1000, [400], 3, 0, disjoint=True)


def test_the_floor_rows_read_each_method_s_share_of_the_bytes():
    from kvcache.config import KVCacheConfig
    from kvcache.engine.eval_cli import floor_grid, method_grid, nominal_share

    config = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, page_size=8, dtype="float32", device="cpu",
                           device_pages=16)
    grid = method_grid(512, 8, "4:8", "2", itemsize=4, head_dim=16, at_bytes="window:4")
    added = floor_grid(grid, 512, config, "auto")
    assert [label for label, _ in added] == ["window floor 0.625"]  # quest pages/2 reads 5/8 (summaries included)
    windows = [s for _, s in grid + added if s.method == "window"]
    for _, spec in grid:
        if spec.method in ("sparq", "quest"):  # a window row reads as many positions as its share of them
            share = nominal_share(spec, 512, config)
            assert any(abs(w.params["window"] + w.params.get("sinks", 4) - share * 512) <= 0.5 for w in windows)
    # sparq r=4 k=S/8 reads 1/4 (and its mean value): the grid's window bytes/4 is its floor, not repeated
    assert dict(floor_grid(grid, 512, config, "8"))["window bytes/8"].params == \
        dict(method_grid(512, 8, "", "", at_bytes="window:8"))["window bytes/8"].params
    assert floor_grid(grid, 512, config, "") == []


# ---- end to end ----------------------------------------------------------------------------------------------


def test_eval_heldout_writes_intervals_and_the_floor(texts, tmp_path, monkeypatch):
    from kvcache.cli import main

    model = random_model(CONFIG, seed=7)
    use_model(monkeypatch, model)
    out = tmp_path / "eval.json"
    assert main(["eval", "--heldout", "--windows", "3", "--contexts", "64", "--eval-tokens", "9", "--agree-tokens",
                 "4", "--passkey-lengths", "", "--sparq", "4:8", "--quest", "2", "--page-size", "8",
                 "--bootstrap", "500", "--json", str(out), "--plot", str(tmp_path / "eval.png")]) == 0
    report = json.loads(out.read_text())
    assert report["text"]["evaluation"] == EVALUATION_SOURCE and report["text"]["calibration"] == CALIBRATION_SOURCE
    assert report["windows"] == 3 and report["bootstrap"]["resamples"] == 500
    starts = report["window_starts"]["64"]
    assert len(starts) == 3 and all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # disjoint
    assert starts[-1] > report["text"]["evaluation_tokens"] // 2  # spread over the text, not its start
    pooled = {r["method"]: r for r in report["perplexity_mean"]}
    dense = pooled["dense"]
    assert (dense["ppl_ratio"], dense["ppl_ratio_ci95"], dense["top1_agreement_forced"],
            dense["top1_agreement_ci95"]) == (1.0, [1.0, 1.0], 1.0, [1.0, 1.0])
    floors = [r for r in pooled.values() if r["attention"] == "window"]
    assert len(floors) == 2  # one at each method's bytes
    for name in ("sparq r=4 k=S/8", "quest pages/2"):
        row = pooled[name]
        lo, hi = row["ppl_ratio_ci95"]
        assert lo <= row["ppl_ratio"] <= hi and row["scored_tokens"] == 3 * 8 and row["windows"] == 3
        assert row["ppl_ratio_windows"]["min"] <= row["ppl_ratio_windows"]["median"] <= row["ppl_ratio_windows"]["max"]
        a_lo, a_hi = row["top1_agreement_ci95"]
        assert 0 <= a_lo <= row["top1_agreement_forced"] <= a_hi <= 1
        assert 0 < row["bytes_vs_dense"] < 1 and row["bytes_per_token"] > 0
        per_window = [r for r in report["perplexity"] if r["method"] == name]
        dense_windows = [r for r in report["perplexity"] if r["method"] == "dense"]
        nll = sum(r["nll_sum"] for r in per_window) - sum(r["nll_sum"] for r in dense_windows)
        assert row["ppl_ratio"] == pytest.approx(math.exp(nll / row["scored_tokens"]))
        floor = row["floor"]
        assert floor["method"] in {f["method"] for f in floors} and floor["equal_bytes"]
        assert floor["bytes_vs_dense"] == pytest.approx(row["bytes_vs_dense"], rel=0.05)
        assert floor["verdict"] in ("better", "worse", "tie")
        assert row["beats_floor"] == (floor["verdict"] == "better")
    assert all(f["floor"] is None and f["beats_floor"] is None for f in floors)
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_min_coverage_rows_repeat_every_sparse_budget_row_with_the_threshold():
    from kvcache.engine.eval_cli import method_grid

    rows = method_grid(2048, 16, "", "", at_bytes="sparq:8,window:8", min_coverage="0.75,0.9", num_layers=30)
    grid = dict(rows)
    assert len(grid) == len(rows) == 5  # dense, the two budget rows, SparQ's at each threshold
    assert grid["sparq bytes/8 cov>=0.75"].params == {**grid["sparq bytes/8"].params, "min_coverage": 0.75}
    assert grid["sparq bytes/8 cov>=0.9"].params == {**grid["sparq bytes/8"].params, "min_coverage": 0.9}
    assert "window bytes/8 cov>=0.75" not in grid  # the window has no coverage estimate


def test_a_byte_share_may_be_a_fraction_of_a_whole_and_nonsense_is_refused():
    from kvcache.engine.eval_cli import method_grid

    grid = dict(method_grid(2048, 16, "", "", at_bytes="sparq:6.5,sparq:6", num_layers=30))
    assert grid["sparq bytes/6.5"].params["k"] < grid["sparq bytes/6"].params["k"]  # fewer rows at the smaller share
    for bad in ("sparq:0.5", "sparq:x", "nope:8"):
        with pytest.raises(ValueError, match="number f >= 1"):
            method_grid(2048, 16, "", "", at_bytes=bad, num_layers=30)


def test_eval_scores_the_ruler_suite_as_agreement_with_dense(texts, tmp_path, monkeypatch):
    from kvcache.cli import main

    model = random_model(CONFIG, seed=7)
    use_model(monkeypatch, model)
    out = tmp_path / "eval.json"
    assert main(["eval", "--contexts", "64", "--eval-tokens", "9", "--agree-tokens", "0", "--passkey-lengths", "",
                 "--sparq", "4:8", "--quest", "", "--page-size", "8", "--ruler-lengths", "1000", "--ruler-items", "1",
                 "--json", str(out), "--plot", ""]) == 0
    report = json.loads(out.read_text())
    tasks = {r["task"] for r in report["ruler"]}
    assert tasks == {"single_needle", "multi_key_needle", "multi_value", "variable_tracking"}
    summary = {r["method"]: r for r in report["ruler_summary"]}
    assert summary["dense"]["agreement"] == 1.0 and summary["dense"]["items"] == 4
    assert 0 <= summary["sparq r=4 k=S/8"]["agreement"] <= 1
