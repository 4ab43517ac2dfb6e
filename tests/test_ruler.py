"""The RULER-style suite (engine/ruler.py): its items are reproducible, exactly as long as asked, hold what their
questions ask for, and the runner scores each method by agreement with dense's answer tokens."""

from __future__ import annotations

import re

import pytest

from kvcache import InProcessClient, KVCacheConfig
from kvcache.engine import ruler
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import DENSE, AttentionSpec
from kvcache.engine.model import random_model

TASKS = list(ruler.GENERATORS)
LENGTH = 800  # tokens (bytes here): room for every task's intro, statements and question


class Bytes:
    """A byte-level tokenizer: a token per UTF-8 byte, so lengths and texts are easy to reason about."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


TOK = Bytes()
CONFIG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=2048)


def text_of(item: ruler.RulerItem) -> str:
    return TOK.decode(item.ids)


# ---- items ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_an_item_is_the_same_for_a_seed_and_differs_across_seeds(task):
    make = ruler.GENERATORS[task]
    assert make(TOK, LENGTH, 3) == make(TOK, LENGTH, 3)
    other = make(TOK, LENGTH, 4)
    assert other.ids != make(TOK, LENGTH, 3).ids and other.expected != make(TOK, LENGTH, 3).expected


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [LENGTH, 1531, 4096])
def test_a_prompt_is_exactly_the_target_length(task, length):
    item = ruler.GENERATORS[task](TOK, length, 11)
    assert len(item.ids) == item.length == length


def test_a_target_too_short_for_the_statements_and_question_is_refused():
    with pytest.raises(ValueError, match="no room for a haystack"):
        ruler.multi_value(TOK, 300, 0)


@pytest.mark.parametrize("task", TASKS)
def test_the_prompt_ends_with_the_question_and_the_answer_is_the_expected_list(task):
    item = ruler.GENERATORS[task](TOK, LENGTH, 5)
    text = text_of(item)
    assert text.endswith(TOK.decode(item.ids[-item.question_tokens:]))
    assert item.answer == " " + ", ".join(item.expected)
    assert item.answer_tokens == len(TOK.encode(item.answer))
    assert ruler.is_correct(item, item.answer)


def test_a_single_needle_holds_the_asked_keys_number_once():
    item = ruler.single_needle(TOK, LENGTH, 7)
    text = text_of(item)
    key = re.search(r"special magic number for ([a-z]+-[a-z]+) mentioned", text).group(1)
    assert text.count(f"One of the special magic numbers for {key} is: {item.expected[0]}.") == 1
    assert re.findall(r"\d+", text) == [item.expected[0]]  # the haystack holds no other number


@pytest.mark.parametrize("depth, where", [(0.0, "first"), (1.0, "last")])
def test_depth_places_the_needle_at_that_share_of_the_haystack(depth, where):
    item = ruler.single_needle(TOK, 2000, 7, depth=depth)
    text = text_of(item)
    needle = text.index("One of the special")
    if where == "first":
        assert text[:needle] == ruler.NEEDLE_INTRO + " "
    else:
        assert text[needle:].split(".", 1)[1].startswith("\nWhat is the special magic number")


def test_multi_key_distractors_have_other_keys_and_numbers_and_only_the_asked_one_is_expected():
    item = ruler.multi_key_needle(TOK, LENGTH, 9, keys=4)
    text = text_of(item)
    needles = dict(re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text))
    asked = re.search(r"special magic number for ([a-z]+-[a-z]+) mentioned", text).group(1)
    assert len(needles) == 4 and len(set(needles.values())) == 4
    assert item.expected == (needles[asked],)


def test_multi_value_expects_every_number_of_the_key_in_prompt_order():
    item = ruler.multi_value(TOK, LENGTH, 2, values=4)
    text = text_of(item)
    found = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
    assert len({key for key, _ in found}) == 1
    assert tuple(value for _, value in found) == item.expected and len(set(item.expected)) == 4
    assert list(item.depths) == sorted(item.depths)


@pytest.mark.parametrize("seed", range(5))
def test_variable_tracking_expects_the_variables_that_the_prompts_assignments_give_the_asked_value(seed):
    item = ruler.variable_tracking(TOK, LENGTH, seed, hops=4, chains=2)
    text = text_of(item)
    value_of: dict[str, str] = {}
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text):
        value_of[name] = value_of[source[4:]] if source.startswith("VAR ") else source  # read after assigned
    asked = re.search(r"assigned the value (\d+) in the text above", text).group(1)
    holding = [name for name, value in value_of.items() if value == asked]
    assert len(value_of) == 10 and len(holding) == 5
    assert list(item.expected) == holding


def test_is_correct_wants_every_expected_number_as_a_whole_word_in_any_order():
    item = ruler.multi_value(TOK, LENGTH, 2)
    a, b, c, d = item.expected
    assert ruler.is_correct(item, f":\n1. {d}\n2. {c}\n3. {b}\n4. {a}")
    assert not ruler.is_correct(item, f" {a}, {b}, {c}")
    assert not ruler.is_correct(item, f" {a}, {b}, {c}, {d[:-1]}")
    assert not ruler.is_correct(item, f" {a}, {b}, {c}, {d}9")


def test_the_suite_has_every_task_at_every_length_and_is_reproducible():
    items = ruler.ruler_suite(TOK, [LENGTH, 1200], per_task=2, seed=1)
    assert [(i.task, i.length) for i in items] == [(t, n) for n in (1200, LENGTH) for t in TASKS for _ in range(2)]
    assert items == ruler.ruler_suite(TOK, [LENGTH, 1200], per_task=2, seed=1)
    assert len({i.seed for i in items}) == len(items)
    with pytest.raises(ValueError, match="unknown RULER tasks"):
        ruler.ruler_suite(TOK, [LENGTH], tasks=["niah"])


# ---- scoring -------------------------------------------------------------------------------------


def test_an_answer_differing_from_dense_in_one_token_disagrees():
    item = ruler.single_needle(TOK, LENGTH, 1)
    base = TOK.encode(item.answer)
    changed = base[:-1] + [base[-1] ^ 1]
    rows = ruler.score_item(item, ["dense", "other"], [base, changed], [100.0, 25.0], 0, TOK)
    assert [r["same_as_dense"] for r in rows] == [True, False]
    assert [r["tokens_equal"] for r in rows] == [len(base), len(base) - 1]
    assert [r["correct"] for r in rows] == [True, False]
    pooled = ruler.aggregate(rows)
    assert [(r["method"], r["agreement"], r["exact"], r["bytes_vs_dense"]) for r in pooled] == \
        [("dense", 1.0, 1.0, 1.0), ("other", 0.0, 0.0, 0.25)]


def test_summarize_pools_tasks_per_length_and_method_weighted_by_items():
    rows = [{"task": "a", "length": 64, "method": "dense", "items": 1, "agreement": 1.0, "token_agreement": 1.0,
             "exact": 0.0, "bytes_per_token": 8.0},
            {"task": "b", "length": 64, "method": "dense", "items": 3, "agreement": 1.0, "token_agreement": 1.0,
             "exact": 1.0, "bytes_per_token": 8.0},
            {"task": "a", "length": 64, "method": "sparq", "items": 1, "agreement": 0.0, "token_agreement": 0.5,
             "exact": None, "bytes_per_token": 1.0},
            {"task": "b", "length": 64, "method": "sparq", "items": 3, "agreement": 1.0, "token_agreement": 1.0,
             "exact": None, "bytes_per_token": 2.0}]
    dense, sparq = ruler.summarize(rows)
    assert (dense["items"], dense["tasks"], dense["exact"], dense["bytes_vs_dense"]) == (4, 2, 0.75, 1.0)
    assert (sparq["agreement"], sparq["token_agreement"], sparq["exact"]) == (0.75, 0.875, None)
    assert sparq["bytes_vs_dense"] == pytest.approx(1.75 / 8)


def test_specs_without_a_plain_dense_one_are_refused():
    with pytest.raises(ValueError, match="plain dense"):
        ruler.dense_row([("sparq", AttentionSpec("sparq", {"r": 4, "k": 8})),
                         ("dense@0", AttentionSpec("dense", {}, {0: ("window", {"window": 4})}))])


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=3)


def test_dense_twice_and_sparq_reading_everything_agree_with_dense_and_a_window_reads_less(model):
    client = InProcessClient(KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, page_size=16,
                                           dtype="float32", device="cpu", device_pages=1024))
    items = [ruler.GENERATORS[task](TOK, LENGTH, 1) for task in TASKS]
    whole = max(i.length + i.answer_tokens for i in items)
    specs = [("dense", DENSE), ("dense again", DENSE),
             ("sparq r=d k=all", AttentionSpec("sparq", {"r": 16, "k": whole, "local_window": 0})),
             ("window 64", AttentionSpec("window", {"window": 64, "sinks": 4}))]
    logged: list[str] = []
    rows = ruler.ruler_agreement(model, client, specs, items, TOK, log=logged.append)
    assert [(r["task"], r["method"]) for r in rows] == [(t, label) for t in TASKS for label, _ in specs]
    assert len(logged) == len(items)
    for r in rows:
        assert r["items"] == 1 and 0.0 <= r["exact"] <= 1.0
        if r["method"] != "window 64":
            assert r["agreement"] == r["token_agreement"] == 1.0 and r["bytes_vs_dense"] == 1.0
        else:
            assert 0 < r["bytes_vs_dense"] < 0.2
    summary = ruler.summarize(rows)
    assert [(s["length"], s["method"], s["items"]) for s in summary] == [(LENGTH, label, 4) for label, _ in specs]
