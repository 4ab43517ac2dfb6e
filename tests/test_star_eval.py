"""Star Attention in the accuracy harness (`kvcache eval --star`, docs/sparse-attention.md §4): the
harness's perplexity and greedy paths with the prompt encoded by phase 1 and the rest through phase 2."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from eval_support import ByteTokenizer, use_model
from service_support import (
    STORE,
    in_process_shards,
    one_torch_thread,  # noqa: F401 (an autouse fixture: importing it applies it here)
    start_servers,
    stop_servers,
    store_config,
)

from kvcache import InProcessClient
from kvcache.clients.sharded import ShardedClient
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import DENSE
from kvcache.engine.evaluation import greedy_methods, teacher_force
from kvcache.engine.model import random_model
from kvcache.engine.star_eval import StarEncoder, StarSetting, parse_settings

CONFIG = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=STORE["num_layers"],
                     num_heads=4, num_kv_heads=STORE["num_kv_heads"], head_dim=STORE["head_dim"], rope_theta=1000.0,
                     max_position_embeddings=1024)
TEXT = [int(t) for t in torch.randint(0, 101, (61,), generator=torch.Generator().manual_seed(1))]
PREFIX, CONTINUATION = TEXT[:45], TEXT[45:]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=7)


def star(n: int, anchor: str, block: int | None = None, query_tokens: int = 1) -> StarEncoder:
    return StarEncoder(StarSetting(n, block, Fraction(anchor)), query_tokens=query_tokens, chunk_size=8)


def kv_of(client, seq: str, n: int) -> torch.Tensor:
    """K and V of positions 0..n-1, [2, L, n, Hkv, d], read back in position order."""
    rows = torch.arange(n).expand(CONFIG.num_kv_heads, n)
    per_layer = [client.fetch(seq, layer, "rows", rows).tensors for layer in range(CONFIG.num_layers)]
    return torch.stack([torch.stack([t[i] for t in per_layer]) for i in range(2)]).transpose(2, 3)


def dense_kv(model, prompt: list[int]) -> torch.Tensor:
    from kvcache.engine.prefill import prefill

    client = InProcessClient(store_config())
    seq = client.create().seq_id
    prefill(model, client, seq, prompt)
    return kv_of(client, seq, len(prompt))


# ---- settings --------------------------------------------------------------------------------


def test_settings_are_the_product_of_shards_blocks_and_anchors():
    got = parse_settings("4,2", "auto,512", "1,1/4,0")
    assert len(got) == 12 and got[0] == StarSetting(4, None, Fraction(1))
    assert [s.label for s in got[:3]] == ["star N=4 b=C/4 a=b", "star N=4 b=C/4 a=b/4", "star N=4 b=C/4 a=0"]
    assert got[-1].label == "star N=2 b=512 a=0"
    plan = StarSetting(4, None, Fraction(1, 4)).plan(4031)  # b = ceil(4031 / 4), anchor floor(b / 4)
    assert (plan.block_size, plan.anchor_size, plan.shard_lengths()) == (1008, 252, [1008, 1008, 1008, 1007])
    assert StarSetting(2, 10, Fraction(3, 4)).label == "star N=2 b=10 a=3b/4"
    for bad in (("0", "auto", "1"), ("2", "auto", "5/4"), ("2", "-3", "1"), ("2", "", "1")):
        with pytest.raises(ValueError):
            parse_settings(*bad)


def test_the_query_is_the_prompts_last_tokens_and_never_all_of_it():
    assert star(2, "1", query_tokens=1).split(45) == 44
    assert star(2, "1", query_tokens=7).split(45) == 38
    assert star(2, "1", query_tokens=99).split(45) == 1
    with pytest.raises(ValueError, match="context and a query"):
        star(2, "1").split(1)


# ---- the harness with Star's encoding --------------------------------------------------------


def test_one_shard_scores_and_generates_as_dense_prefill(model):
    """N=1: phase 1 is one causal block, phase 2 attends to one shard, so every figure is dense's."""
    want = teacher_force(model, InProcessClient(store_config()), PREFIX, CONTINUATION, [DENSE])
    want_free = greedy_methods(model, InProcessClient(store_config()), PREFIX, [DENSE], 10)
    with in_process_shards(1) as client:
        got = teacher_force(model, client, PREFIX, CONTINUATION, [DENSE], encode=star(1, "1/4", query_tokens=5))
        got_free = greedy_methods(model, client, PREFIX, [DENSE], 10, encode=star(1, "0"))
    torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax, want.argmax)
    assert got_free == want_free
    assert got.bytes_per_token == want.bytes_per_token  # one shard reads what one store reads


def test_two_shards_with_the_anchor_a_whole_block_hold_the_dense_kv(model):
    """2 shards, anchor = block 1 = everything before block 2: block 2 sees its whole past, as in causal prefill."""
    prompt = PREFIX
    want = dense_kv(model, prompt)
    want_run = teacher_force(model, InProcessClient(store_config()), PREFIX, CONTINUATION, [DENSE])
    with in_process_shards(2) as client:
        encoder = star(2, "1")
        seq, _ = encoder(model, client, prompt)
        assert client.shard_lengths(seq) == [22, 23]  # context 44 = blocks of 22; the query token on the last
        torch.testing.assert_close(kv_of(client, seq, len(prompt)), want, rtol=1e-5, atol=1e-5)
        client.free(seq)
        run = teacher_force(model, client, PREFIX, CONTINUATION, [DENSE], encode=encoder)
    torch.testing.assert_close(run.nll, want_run.nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "anchor"), [(2, "1/4"), (2, "0"), (3, "1")])
def test_an_anchor_short_of_the_whole_past_changes_the_kv_and_the_scores(model, n, anchor):
    """The comparison above can fail: blocks that do not see all their past differ from causal prefill."""
    want = dense_kv(model, PREFIX)
    want_run = teacher_force(model, InProcessClient(store_config()), PREFIX, CONTINUATION, [DENSE])
    with in_process_shards(n) as client:
        seq, _ = star(n, anchor)(model, client, PREFIX)
        got = kv_of(client, seq, len(PREFIX))
        client.free(seq)
        run = teacher_force(model, client, PREFIX, CONTINUATION, [DENSE], encode=star(n, anchor))
    block = -(-(len(PREFIX) - 1) // n)
    torch.testing.assert_close(got[:, :, :block], want[:, :, :block], rtol=1e-5, atol=1e-5)  # block 1: alone
    assert float((got[:, :, block:] - want[:, :, block:]).abs().max()) > 1e-3
    assert float((run.nll - want_run.nll).abs().max()) > 1e-4


def test_the_shards_can_be_kvcache_serve_processes(model):
    """--star-servers: the same anchored blocks on two servers score as on two in-process stores."""
    procs = start_servers({name: ((), {}) for name in ("s0", "s1")})
    try:
        with ShardedClient([procs["s0"].target, procs["s1"].target]) as remote:
            got = teacher_force(model, remote, PREFIX, CONTINUATION, [DENSE], encode=star(2, "1/4", block=10))
    finally:
        stop_servers(list(procs.values()))
    with in_process_shards(2) as local:
        want = teacher_force(model, local, PREFIX, CONTINUATION, [DENSE], encode=star(2, "1/4", block=10))
    torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-5)


# ---- `kvcache eval --star` -------------------------------------------------------------------


def test_eval_star_writes_rows_for_every_setting(model, tmp_path, monkeypatch):
    from kvcache.cli import main

    use_model(monkeypatch, model)
    out = tmp_path / "eval.json"
    assert main(["eval", "--star", "--shards", "1,2", "--star-anchors", "1,0", "--contexts", "96", "--eval-tokens",
                 "12", "--agree-tokens", "6", "--passkey-lengths", "400", "--depths", "0.5", "--sparq", "",
                 "--quest", "2", "--json", str(out), "--plot", str(tmp_path / "eval.png")]) == 0
    report = json.loads(out.read_text())
    methods = ["dense", "quest pages/2", "star N=1 b=C/1 a=b", "star N=1 b=C/1 a=0", "star N=2 b=C/2 a=b",
               "star N=2 b=C/2 a=0"]
    assert [r["method"] for r in report["perplexity"]] == methods
    assert [r["method"] for r in report["agreement"]] == methods
    assert [r["method"] for r in report["passkey"]] == methods
    rows = {r["method"]: r for r in report["perplexity"]}
    two = rows["star N=2 b=C/2 a=0"]
    assert (two["prefill"], two["attention"], two["shards"], two["block_size"], two["anchor_size"],
            two["anchor_fraction"], two["star_context_tokens"], two["star_query_tokens"]) == \
        ("star", "dense", 2, 42, 0, "0", 83, 1)
    assert rows["star N=2 b=C/2 a=b"]["anchor_size"] == 42
    for one in ("star N=1 b=C/1 a=b", "star N=1 b=C/1 a=0"):  # one shard is dense prefill
        assert abs(rows[one]["vs_dense"]) < 1e-5 and rows[one]["top1_agreement_forced"] == 1.0
        assert rows[one]["bytes_vs_dense"] == 1.0
    assert two["bytes_vs_dense"] == pytest.approx(1.0, abs=0.02)  # Star reads every position, as dense does
    assert abs(two["vs_dense"]) > 1e-4  # anchor 0 over 2 shards is not dense
    key = report["passkey"][-1]
    question = "\nWhat is the pass key? The pass key is"
    assert key["star_query_tokens"] == len(ByteTokenizer(CONFIG.vocab_size).encode(question))
    assert report["star"]["settings"] == methods[2:]
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_bench_star_accuracy_is_the_harness_without_passkey(model, tmp_path, monkeypatch):
    from kvcache.cli import main

    use_model(monkeypatch, model)
    out = tmp_path / "bench.json"
    assert main(["bench", "star", "--accuracy", "--shards", "2", "--anchors", "1/2,0", "--contexts", "64",
                 "--eval-tokens", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["perplexity"]] == ["dense", "star N=2 b=C/2 a=b/2", "star N=2 b=C/2 a=0"]
    assert [r["anchor_size"] for r in report["perplexity"][1:]] == [14, 0]  # b = ceil(55 / 2) = 28
    assert report["passkey"] == []


def test_eval_over_several_windows_scores_each_and_pools_them(model, tmp_path, monkeypatch):
    import math

    from kvcache.cli import main

    use_model(monkeypatch, model)
    out = tmp_path / "eval.json"
    assert main(["eval", "--star", "--shards", "2", "--star-anchors", "0", "--contexts", "64", "--eval-tokens", "8",
                 "--agree-tokens", "4", "--windows", "3", "--window-stride", "500", "--passkey-lengths", "",
                 "--sparq", "", "--quest", "", "--json", str(out), "--plot", str(tmp_path / "eval.png")]) == 0
    report = json.loads(out.read_text())
    rows = report["perplexity"]
    assert [(r["window_start"], r["method"]) for r in rows] == [
        (s, m) for s in (0, 500, 1000) for m in ("dense", "star N=2 b=C/2 a=0")]
    assert len({r["perplexity"] for r in rows if r["method"] == "dense"}) == 3  # three stretches of text
    assert [r["window_start"] for r in report["agreement"]] == [0, 0, 500, 500, 1000, 1000]
    dense, star = report["perplexity_mean"]
    assert (dense["method"], star["method"], star["windows"], star["window_starts"]) == \
        ("dense", "star N=2 b=C/2 a=0", 3, [0, 500, 1000])
    logs = {m: [math.log(r["perplexity"]) for r in rows if r["method"] == m] for m in (dense["method"], star["method"])}
    assert dense["vs_dense"] == 0 and star["perplexity"] == pytest.approx(math.exp(sum(logs[star["method"]]) / 3))
    assert star["vs_dense"] == pytest.approx(math.exp((sum(logs[star["method"]]) - sum(logs["dense"])) / 3) - 1)
    assert star["worst_window_vs_dense"] == max(r["vs_dense"] for r in rows if r["method"] == star["method"])
    assert star["shards"] == 2 and "window_start" not in star
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_a_window_past_the_end_of_the_text_is_refused(model, tmp_path, monkeypatch):
    from kvcache.cli import main

    use_model(monkeypatch, model)
    with pytest.raises(SystemExit, match="passes the end of the text"):
        main(["eval", "--contexts", "64", "--windows", "2", "--window-stride", "10000000", "--passkey-lengths", "",
              "--sparq", "", "--quest", "", "--json", str(tmp_path / "e.json"), "--plot", ""])


def test_eval_scores_the_oracle_page_choice(model, tmp_path, monkeypatch):
    from kvcache.cli import main

    use_model(monkeypatch, model)
    out = tmp_path / "eval.json"
    assert main(["eval", "--contexts", "128", "--eval-tokens", "8", "--agree-tokens", "4", "--passkey-lengths", "",
                 "--sparq", "", "--quest", "", "--oracle-bytes", "2", "--page-size", "8", "--json", str(out),
                 "--plot", str(tmp_path / "eval.png")]) == 0
    from kvcache.methods.gate import gate_budget_for_share
    from kvcache.methods.gate_model import GATE_DIM

    rows = {r["method"]: r for r in json.loads(out.read_text())["perplexity"]}
    oracle = rows["oracle bytes/2"]
    # As many pages as gate bytes/2 would read (its gate keys priced in), chosen by true attention mass.
    budget = gate_budget_for_share(128, 8, 1 / 2, CONFIG.head_dim, 4, GATE_DIM, 4)
    assert oracle["attention"] == "oracle" and oracle["params"] == {"budget": budget}
    assert 0 < oracle["bytes_vs_dense"] < 1 and oracle["vs_dense"] != 0


def _tiny_gate_eval(model, tmp_path, monkeypatch, context: int, gate_bytes: str) -> list[str]:
    """`kvcache eval` flags scoring the tiny model with a random gate of pages of 8 (no SparQ, Quest or passkeys)."""
    from kvcache.methods.gate_model import GateShape, PageGate
    from kvcache.methods.gate_store import save_gate

    use_model(monkeypatch, model)
    G = CONFIG.num_heads // CONFIG.num_kv_heads
    gate = save_gate(PageGate(GateShape(CONFIG.num_layers, CONFIG.num_kv_heads, G, CONFIG.head_dim, 8, gate_dim=16),
                              seed=3), tmp_path / "tiny.safetensors")
    return ["eval", "--gate", str(gate), "--contexts", str(context), "--eval-tokens", "8", "--agree-tokens", "4",
            "--passkey-lengths", "", "--sparq", "", "--quest", "", "--gate-bytes", gate_bytes, "--gate-pages", "",
            "--page-size", "8", "--json", str(tmp_path / "eval.json"), "--plot", str(tmp_path / "eval.png")]


def test_eval_scores_gate_threshold_settings_and_refuses_one_that_does_not_apply(model, tmp_path, monkeypatch):
    from kvcache.cli import main

    flags = _tiny_gate_eval(model, tmp_path, monkeypatch, 128, "")
    out = tmp_path / "eval.json"
    assert main(flags + ["--gate-threshold", "2/n,0.05"]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["perplexity"]}
    assert rows["gate thr=2/n"]["params"] == {"threshold": pytest.approx(2 / (128 // 8 - 2))}
    assert rows["gate thr=0.05"]["params"] == {"threshold": 0.05}
    assert all(0 < rows[m]["bytes_vs_dense"] < 1.2 for m in ("gate thr=2/n", "gate thr=0.05"))
    assert (tmp_path / "eval.png").stat().st_size > 0
    out.unlink()
    with pytest.raises(SystemExit, match="does not apply at 128 tokens"):  # 20/14 > 1, refused before any scoring
        main(flags + ["--gate-threshold", "2/n,20/n"])
    assert not out.exists()


def test_eval_gate_rows_with_oracle_layers_and_dense_layers_refused_past_the_budget(model, tmp_path, monkeypatch):
    from kvcache.cli import main

    flags = _tiny_gate_eval(model, tmp_path, monkeypatch, 256, "3")
    out = tmp_path / "eval.json"
    assert main(flags + ["--gate-oracle-layers", "1"]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["perplexity"]}
    plain, oracle_at = rows["gate bytes/3"], rows["gate bytes/3 oracle@1"]
    assert oracle_at["layers"] == {"1": {"attention": "oracle", "params": plain["params"]}}
    assert oracle_at["params"] == plain["params"]
    # The oracle's layer reads the same pages' worth but no gate keys, and chooses otherwise.
    assert oracle_at["bytes_per_token"] < plain["bytes_per_token"]
    assert oracle_at["perplexity"] != plain["perplexity"]
    for bad, why in (("0", "1 dense layers of 2 read more than 1/3"), (str(CONFIG.num_layers), "not within")):
        with pytest.raises(SystemExit, match=why):
            main(flags + ["--gate-dense-layers", bad])


def test_a_spec_runs_its_own_method_at_its_own_layers(model):
    from kvcache.engine.decode import AttentionSpec, decode_step

    spec = AttentionSpec("quest", {"top_pages": 1}, {1: ("dense", {})})
    assert spec.at_layer(1, *spec.for_length(100)) == ("dense", {})
    assert spec.at_layer(0, *spec.for_length(100)) == ("quest", {"top_pages": 1})
    client = InProcessClient(store_config())
    seq = client.create().seq_id
    steps = []
    begin = client.begin_step

    def spy(*args, **kw):
        steps.append(begin(*args, **kw))
        return steps[-1]

    client.begin_step = spy
    decode_step(model, client, [seq], [5], [0], spec)
    assert [steps[0].step.method_name(layer) for layer in range(CONFIG.num_layers)] == [
        "quest", "dense", *["quest"] * (CONFIG.num_layers - 2)]
    calls = {m: t["calls"] for m, t in client.stats()["methods"].items()}
    assert calls == {"quest": CONFIG.num_layers - 1, "dense": 1}
