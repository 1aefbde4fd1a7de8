"""LongBench and RULER metrics on hand-worked examples."""

from __future__ import annotations

import pytest

from fastkv.eval import longbench
from fastkv.eval.metrics import best_score, normalize_answer, qa_f1, rouge_l, string_match_all, string_match_part


def test_normalization_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("The Eiffel Tower", "Eiffel tower", 1.0),
        ("in Paris France", "Paris", 0.5),  # P = 1/3, R = 1
        ("", "Paris", 0.0),
        ("London", "Paris", 0.0),
    ],
)
def test_qa_f1(prediction, reference, expected):
    assert qa_f1(prediction, reference) == pytest.approx(expected)


def test_several_references_keep_the_best():
    assert best_score("qa_f1", "Paris", ["London", "Paris", "Rome"]) == 1.0
    assert best_score("qa_f1", "in Paris France", ["Paris France", "Paris"]) == pytest.approx(0.8)


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "the cat") == 1.0


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("other location", "other location", 1.0),  # "location" is part of the reference label
        ("person or location", "person", 0.5),
        ("location", "person", 0.0),
        ("", "person", 0.0),
    ],
)
def test_classification(prediction, reference, expected):
    classes = ["location", "other location", "person"]
    assert best_score("classification", prediction, [reference], all_classes=classes) == expected


@pytest.mark.parametrize(
    "prediction, expected", [("Paragraph 12", 1.0), ("Paragraph 3 or Paragraph 12", 0.5), ("", 0.0), ("12", 1.0)]
)
def test_retrieval(prediction, expected):
    assert best_score("retrieval", prediction, ["Paragraph 12"]) == expected


@pytest.mark.parametrize("prediction, expected", [("There are 7 unique", 1.0), ("7 or 8", 0.5), ("none", 0.0)])
def test_count(prediction, expected):
    assert best_score("count", prediction, [7]) == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [("```python\nx = 1\n```", 1.0), ("# set x\nx = 1", 1.0), ("", 0.0), ("x = 1", 1.0)],
)
def test_code_similarity_reads_the_first_code_line(prediction, expected):
    assert best_score("code_sim", prediction, ["x = 1"]) == pytest.approx(expected)


def test_code_similarity_is_fuzzy():
    assert 0.5 < best_score("code_sim", "x = 10", ["x = 1"]) < 1.0


def test_ruler_string_matches():
    assert string_match_all("codes 123 and 789", ["123", "456"]) == 0.5
    assert string_match_part("codes 123 and 789", ["123", "456"]) == 1.0
    assert string_match_all("ABC", ["abc"]) == 1.0  # case-insensitive
    assert string_match_part("", ["abc"]) == 0.0


def test_unknown_metric_and_missing_references_raise():
    with pytest.raises(ValueError, match="unknown metric"):
        best_score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="no references"):
        best_score("qa_f1", "x", [])


def test_longbench_postprocess_and_task_checks(tmp_path):
    assert longbench.postprocess("trec", "\nLocation\nmore text") == "Location"
    assert longbench.postprocess("qasper", "a\nb") == "a\nb"
    with pytest.raises(ValueError, match="Chinese"):
        longbench.load_task(tmp_path, "dureader")
    with pytest.raises(ValueError, match="unknown LongBench task"):
        longbench.load_task(tmp_path, "nosuch")
    with pytest.raises(FileNotFoundError, match="trec.jsonl"):
        longbench.load_task(tmp_path, "trec")


def test_longbench_prompts_from_files(tmp_path):
    row = {"input": "What is it?", "context": "Some story.", "answers": ["a dog"], "all_classes": None}
    (tmp_path / "narrativeqa.jsonl").write_text(__import__("json").dumps(row) + "\n")
    (example,) = longbench.load_task(tmp_path, "narrativeqa")
    assert "Story: Some story." in example.prompt and "Question: What is it?" in example.prompt
    assert example.max_tokens == 128 and example.chat
    assert longbench.score(example, "A dog.") == 1.0


def test_paired_difference_by_hand():
    from fastkv.eval.paired import paired_difference, reference_for

    def rows(scores):
        return [{"task": t, "index": i, "score": s} for t, values in scores.items() for i, s in enumerate(values)]

    method = rows({"a": [1, 0], "b": [1], "c": [1]})
    ref = rows({"a": [0, 0], "b": [1]})  # task c has no pair: left out
    d = paired_difference(method, ref)
    # a: differences 100 and 0 (mean 50), b: 0 -> macro 25; resampling a gives 0, 50 or 100 -> 0 .. 50
    assert d == {"diff": 25.0, "low": 0.0, "high": 50.0, "pairs": 3}
    assert paired_difference(method, []) is None
    specs = ["fullkv", "snapkv(retain_rate=0.1, window_size=8)", "snapkv(retain_rate=0.25, window_size=8)"]
    assert reference_for("fastkv(tsp_rate=0.2, retain_rate=0.25)", specs, "snapkv") == specs[2]
    assert reference_for("fastkv(tsp_rate=0.2)+adakv(budget=64)", specs, "snapkv") == specs[1]  # no match: first
    assert reference_for("adakv(retain_rate=0.1)", specs, "fullkv") == "fullkv"
    assert reference_for("adakv(retain_rate=0.1)", specs[:1], "snapkv") is None
