"""The five tasks: honest data, a cache that notices change, and one task end to end."""

from __future__ import annotations

import pytest
import torch

from harness.errors import InputError
from harness.suite import expand, load_suite, parse_text
from harness.tasks import ARTICLE_TASKS, TASKS, chatbot, common, retrieval, run_task, segmentation, text_classification
from tests.conftest import ROOT


def test_every_variant_has_its_task():
    assert sorted(TASKS[t] for t in ARTICLE_TASKS) == sorted(
        ["self_attention", "multi_head", "causal", "cross_attention", "attention_gate"]
    )


def test_task_data_is_deterministic():
    a, b = text_classification.make_data(50, seed=3), text_classification.make_data(50, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_negation_right_before_the_sentiment_word_flips_the_label():
    tokens, labels = text_classification.make_data(500, seed=4)
    ids = {w: i for i, w in enumerate(text_classification.VOCAB)}
    positive = {ids[w] for w in text_classification.POSITIVE}
    sentiment = {ids[w] for w in text_classification.POSITIVE + text_classification.NEGATIVE}
    for row, label in zip(tokens.tolist(), labels.tolist(), strict=True):
        where = next(i for i, t in enumerate(row) if t in sentiment)
        negated = where > 0 and row[where - 1] == ids["not"]
        assert label == int((row[where] in positive) != negated)
    # distracting "not"s exist, so the mere presence of "not" does not decide the label
    has_not = (tokens == ids["not"]).any(1)
    assert 0.3 < has_not.float().mean() < 0.8


def test_chatbot_answers_need_the_earlier_turn():
    tokens, answer_at = chatbot.make_data(200, seed=5)
    words = [[chatbot.VOCAB[t] for t in row] for row in tokens.tolist()]
    for row, at in zip(words, answer_at.tolist(), strict=True):
        asked = row[at - 4]
        stated = row[5] if asked == "name" else row[17]
        assert row[at] == stated


def test_retrieval_test_set_has_every_two_digit_caption_once():
    labels = torch.tensor([[a, b] for a in range(10) for b in range(10)])
    assert len({tuple(r) for r in labels.tolist()}) == 100
    scores = torch.eye(100) + 0.01 * torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    assert retrieval.recall_at(scores, 1) == 1.0


def test_segmentation_targets_are_discs_not_squares():
    images, masks = segmentation.make_data(20, seed=6)
    assert images.shape == masks.shape == (20, 1, 32, 32)
    assert 0 < masks.mean() < 0.5 and set(masks.unique().tolist()) <= {0.0, 1.0}


def test_the_weight_cache_notices_changed_code_and_torch_versions(monkeypatch):
    key = common.source_hash(text_classification.make_data)
    assert common.source_hash(chatbot.dialogue) != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert common.source_hash(text_classification.make_data) != key


def test_a_corrupt_cache_file_is_rebuilt(tmp_path):
    calls = []

    def make():
        return torch.nn.Linear(2, 2)

    def train(model):
        calls.append(1)
        return {}

    common.train_or_load("toy", make, train, (make,), tmp_path)
    common.train_or_load("toy", make, train, (make,), tmp_path)
    assert len(calls) == 1  # the second call loaded the cache
    next(tmp_path.glob("toy-*.pt")).write_bytes(b"torn")
    common.train_or_load("toy", make, train, (make,), tmp_path)
    assert len(calls) == 2


def test_the_tasks_suite_expands_to_every_task_and_implementation():
    cases = expand(load_suite(ROOT / "suites" / "tasks.yaml"))
    assert {c.task for c in cases} == set(ARTICLE_TASKS)
    assert "task/chatbot/memory_efficient" in {c.case_id for c in cases}


def test_an_unknown_task_is_a_clear_error():
    with pytest.raises(InputError, match="did you mean 'chatbot'"):
        parse_text("name: t\ntasks: [chatbt]\n", "t.yaml")


@pytest.mark.slow
def test_text_classification_end_to_end_beats_its_baselines_and_agrees_with_naive(tmp_path):
    outcome = run_task("text_classification", "memory_efficient", tmp_path)
    (accuracy,) = outcome["task_metrics"]
    assert accuracy["value"] > accuracy["baseline"] + 0.2  # bag of words cannot see the negation
    assert accuracy["value"] > outcome["task_extra"]["majority_class"] + 0.2
    assert outcome["agreement"] >= 0.99 and outcome["train_seconds"] > 0
    again = run_task("text_classification", "chunked", tmp_path)
    assert again["cached_weights"] is True and again["task_metrics"][0]["naive_value"] == accuracy["naive_value"]


def test_serving_a_ragged_batch_through_pages_gives_the_contiguous_tokens():
    """The chatbot's paged serving path: pages handed out as tokens arrive, read through a block table."""
    torch.manual_seed(0)
    prefill, decode = common.Attention("causal"), common.Attention("decode")
    model = chatbot.GPT(prefill).eval()
    tokens, at = chatbot.make_data(6, seed=3)
    at = int(at[0])
    with torch.no_grad():
        # equal lengths: the batch path must give what the existing generate() gives
        equal = [tokens[i, :at] for i in range(6)]
        expected = chatbot.generate(model, tokens[:, :at], 4, prefill, decode)
        assert torch.equal(chatbot.serve(model, equal, 4, prefill, decode, None), expected)
        ragged = [tokens[i, : at - cut] for i, cut in enumerate([0, 3, 7, 1, 11, 5])]
        contiguous = chatbot.serve(model, ragged, 4, prefill, decode, None)
        for name in ("naive", "memory_efficient"):
            decode.use(name)
            assert torch.equal(chatbot.serve(model, ragged, 4, prefill, decode, 3), contiguous)  # pages of 3
