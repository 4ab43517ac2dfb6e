"""`kvcache search-patterns`: heads whose attention is known choose the pattern that keeps it; the budget
and the tie rule; the search on a tiny random model, its JSON round trip and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine_model import one_torch_thread  # noqa: F401 (an autouse fixture)

from kvcache.engine import patterns as saved
from kvcache.engine.config import ModelConfig
from kvcache.engine.model import random_model
from kvcache.engine.pattern_search import (
    AUTHOR_CANDIDATES,
    REFERENCE_LENGTH,
    choose,
    scaled_candidates,
    score_layer,
    search_patterns,
)
from kvcache.prefill.serving import HeadPattern

T, B, D = 512, 32, 32
PLANTED = [40, 70, 100, 140, 180, 220, 250, 290, 330, 370]  # key positions, each in a block of its own
A_SHAPE = HeadPattern("a_shape", n_init=32, n_local=160)
VERTICAL_SLASH = HeadPattern("vertical_slash", n_vertical=64, n_slash=50)
BLOCK_SPARSE = HeadPattern("block_sparse", top_k=4)
CANDIDATES = [A_SHAPE, VERTICAL_SLASH, BLOCK_SPARSE]


def crafted_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, 2, D], k [T, 1, D] of one layer whose two query heads share their keys (GQA):

    head 0 attends to the PLANTED key columns (its query points along dims 16.. where only they have weight);
    head 1 attends locally: both rotate dims 0..15 by their position, so its scores fall off with the
    distance i - j (most of the mass within ~150 positions, far more than 64).
    """
    theta, scale = 0.003, 40.0
    pos = torch.arange(T, dtype=torch.float64)
    rotated = torch.zeros(T, D // 2, dtype=torch.float64)
    rotated[:, : D // 4] = torch.cos(theta * pos)[:, None]  # every pair (i, i + 8) turns by theta per position
    rotated[:, D // 4 :] = torch.sin(theta * pos)[:, None]
    unit = 1.0 / math.sqrt(D // 4)  # |x|^2 = 1 over the 8 pairs
    k = torch.zeros(T, 1, D, dtype=torch.float64)
    k[:, 0, : D // 2] = rotated * unit
    k[PLANTED, 0, D // 2 :] = 1.0
    q = torch.zeros(T, 2, D, dtype=torch.float64)
    q[:, 0, D // 2 :] = 12.0 * math.sqrt(D) / (D // 2)  # score 12 on every planted key, 0 elsewhere
    q[:, 1, : D // 2] = rotated * unit * scale * math.sqrt(D)  # score 40 cos(theta (i - j))
    return q.float(), k.float()


def test_a_head_looking_at_planted_columns_chooses_vertical_slash():
    q, k = crafted_layer()
    recall, density = score_layer(q, k, CANDIDATES, block_size=B)
    assert recall[0, 1] > 0.99, recall[0]
    assert recall[0, 0] < 0.9 and recall[0, 2] < 0.9, recall[0]
    assert CANDIDATES[choose(recall, density, budget=1.0)[0]] == VERTICAL_SLASH


def test_a_head_looking_nearby_chooses_a_shape():
    q, k = crafted_layer()
    recall, density = score_layer(q, k, CANDIDATES, block_size=B)
    assert recall[1, 0] > 0.99, recall[1]
    assert recall[1, 1] < recall[1, 0] - 0.05 and recall[1, 2] < recall[1, 0] - 0.05, recall[1]
    assert CANDIDATES[choose(recall, density, budget=1.0)[1]] == A_SHAPE


def test_density_is_the_share_of_causal_pairs_the_mask_computes():
    q, k = crafted_layer()
    _, density = score_layer(q, k, [HeadPattern("causal"), A_SHAPE], block_size=B)
    assert torch.allclose(density[:, 0], torch.ones(2))
    # A-shape by hand: the sink block, and the blocks from the one holding (query block start - n_local + 1) on.
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    window_lo = torch.clamp((i // B) * B - 160 + 1, min=0) // B
    allowed = (j <= i) & ((j // B < 1) | (j // B >= window_lo))
    assert torch.allclose(density[:, 1], allowed.sum() / (T * (T + 1) / 2))


def test_candidates_over_the_budget_are_out_and_close_recalls_go_to_the_sparser():
    recall = torch.tensor([[0.90, 0.99, 0.995], [0.90, 0.995, 0.99], [0.5, 0.6, 0.7]])
    density = torch.tensor([[0.3, 0.5, 0.9], [0.3, 0.6, 0.5], [0.8, 0.9, 0.95]])
    # head 0: the best (0.995) is over budget; head 1: 0.99 and 0.995 are within tolerance, 0.99 is sparser;
    # head 2: nothing fits, the sparsest is taken.
    assert choose(recall, density, budget=0.7, tolerance=0.01) == [1, 2, 0]


def test_candidate_sizes_scale_with_the_search_length_and_stay_within_what_the_builders_take():
    assert scaled_candidates(REFERENCE_LENGTH) == list(AUTHOR_CANDIDATES)
    half = scaled_candidates(REFERENCE_LENGTH // 2)
    assert HeadPattern("a_shape", n_init=50, n_local=400) in half
    assert HeadPattern("vertical_slash", n_vertical=30, n_slash=400) in half  # 15 columns: the builder keeps 30
    assert HeadPattern("block_sparse", top_k=4) in half
    assert all(p.params.get("top_k", 2) >= 2 for p in scaled_candidates(64))


def test_search_on_a_tiny_model_saves_a_config_that_loads_back(tmp_path):
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    model = random_model(config, seed=3)
    ids = torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    found = search_patterns(model, ids, name="tiny", block_size=16)
    assert len(found.layers) == 2 and all(len(row) == 4 for row in found.layers)
    candidates = scaled_candidates(256)
    assert all(p in candidates for row in found.layers for p in row)
    assert all(0 < s["recall"] <= 1 + 1e-6 and 0 < s["density"] <= 1 + 1e-6 for row in found.scores for s in row)
    assert sum(found.counts().values()) == 8
    path = tmp_path / "tiny.json"
    found.save(path)
    back = saved.load(path)
    assert back.layers == found.layers
    assert (back.model, back.num_layers, back.num_heads, back.num_kv_heads, back.head_dim) == ("tiny", 2, 4, 2, 16)
    assert back.search["length"] == 256
    assert json.loads(path.read_text())["counts"] == found.counts()


def test_the_command_writes_the_json(tmp_path, monkeypatch):
    import kvcache.engine.load
    from kvcache.cli import main

    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=512)

    class Letters:  # a tokenizer of one token per character
        def encode(self, text: str) -> list[int]:
            return [ord(ch) % 97 for ch in text]

    monkeypatch.setattr(kvcache.engine.load, "load_model", lambda path=None: (random_model(config), Letters()))
    out = tmp_path / "letters.json"
    assert main(["search-patterns", "--length", "128", "--block-size", "16", "--out", str(out)]) == 0
    written = saved.load(out)
    assert written.model == "smollm2-135m" and written.num_heads == 2 and written.search["length"] == 128
    assert main(["search-patterns", "--length", "128", "--block-size", "16", "--kinds", "vertical_slash",
                 "--name", "letters-vs", "--out", str(out)]) == 0
    written = saved.load(out)
    assert written.model == "letters-vs" and {p.pattern for row in written.layers for p in row} == {"vertical_slash"}


def test_a_missing_config_names_the_saved_ones():
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        saved.load("no-such-model")


def test_the_saved_smollm2_config_covers_every_head():
    config = saved.load("smollm2-135m")
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert sum(config.counts().values()) == 270
    config.check_model(30, 9, 3, 64)
    with pytest.raises(ValueError, match="layers, heads"):
        config.check_model(30, 9, 3, 128)
