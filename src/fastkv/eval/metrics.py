"""Scores of generated answers: RULER's string matches and LongBench's metrics, per sample, in [0, 1].

LongBench's definitions (Bai et al., 2023): token F1 after SQuAD-style normalisation, ROUGE-L F1 (from
Google's `rouge-score`), classification and retrieval by the labels/paragraph numbers a prediction
names, counting by the numbers it gives, and code similarity as the fuzzy ratio (`rapidfuzz`) of the
first line of code. A prediction is scored against every reference and keeps its best score.

Fidelity to a reference model: `first_token_kl`, the KL divergence of two next-token distributions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import cache

import torch


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, reference: str, **_) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str, **_) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def classification(prediction: str, reference: str, all_classes: Sequence[str] = (), **_) -> float:
    named = [c for c in all_classes if c in prediction]
    # A label that is part of the reference label (e.g. "location" in "other location") does not count
    # against it.
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    wanted = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(n == wanted[0] for n in numbers) / len(numbers)


def count(prediction: str, reference: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(reference) for n in numbers) / len(numbers)


def code_sim(prediction: str, reference: str, **_) -> float:
    from rapidfuzz import fuzz

    code = next(
        (line for line in prediction.lstrip("\n").split("\n") if not line.lstrip().startswith(("`", "#", "//"))), ""
    )
    return fuzz.ratio(code, reference) / 100


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: the share of references that appear (case-insensitively) in the prediction."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER QA: 1 if any reference appears in the prediction."""
    return float(any(r.lower() in prediction.lower() for r in references))


METRICS = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "retrieval": retrieval,
    "count": count,
    "code_sim": code_sim,
}


def best_score(metric: str, prediction: str, references: Sequence[str], **extra) -> float:
    """The best score of the prediction over the references, in [0, 1]."""
    if metric in ("string_match_all", "string_match_part"):
        return globals()[metric](prediction, references)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    if not references:
        raise ValueError("no references to score against")
    return max(METRICS[metric](prediction, ref, **extra) for ref in references)


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(P_ref || P) of two next-token distributions given as logits [V]."""
    ref = reference_logits.float().log_softmax(-1)
    other = logits.float().log_softmax(-1)
    return float((ref.exp() * (ref - other)).sum())
