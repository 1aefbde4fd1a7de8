"""SamplingParams are checked when made; the transcript's incremental text equals a full decode of its tokens
(on a real byte-level tokenizer, multi-byte characters included) and stops at the first stop string; token
log-probabilities are the model's own."""

from __future__ import annotations

import random

import pytest
import torch

from fastkv.sampling import SamplingParams, Transcript, sample, token_logprob


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 513]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_options_are_refused_by_name(fields, field):
    with pytest.raises(ValueError, match=f"^{field} ") as e:
        SamplingParams(**fields)
    assert e.value.field == field


def test_a_tiny_temperature_is_greedy_and_seeds_fit_int64():
    logits = torch.tensor([0.0, 3.0, 1.0])
    for t in (1e-40, 5e-38, 9e-6):
        assert SamplingParams(temperature=t).greedy and sample(logits, SamplingParams(temperature=t), None) == 1
    assert not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(seed=-(2**63)).generator(torch.device("cpu")) is not None
    assert SamplingParams(stop="end").stop == ("end",)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_incremental_text_equals_a_full_decode(tokenizer):
    text = "Grüße aus Köln 🌍 — 東京タワー, naïve café. " * 6
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for trial in range(20):
        seq = ids if trial == 0 else [rng.choice(ids + [rng.randrange(len(tokenizer))]) for _ in range(80)]
        t = Transcript(tokenizer, eos=set(), stop=[])
        pieces = []
        for token in seq:
            assert t.add(token)
            pieces.append(t.ready())
        pieces.append(t.ready(final=True))
        full = tokenizer.decode(seq, skip_special_tokens=True)
        assert t.text == full and "".join(pieces) == full


def test_a_stop_string_cuts_the_text_where_it_first_appears(tokenizer):
    text = "alpha beta gamma STOP delta STOP epsilon"
    t = Transcript(tokenizer, eos=set(), stop=["STOP", "zeta"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    taken = next(i for i, tok in enumerate(ids) if not t.add(tok))  # generation ends at the first False
    assert t.finish == "stop" and t.text == "alpha beta gamma "
    assert tokenizer.decode(ids[: taken + 1]).endswith("STOP")


def test_token_logprobs_are_the_models_log_softmax():
    logits = torch.randn(50)
    found = token_logprob(logits, 7, 3)
    reference = logits.log_softmax(-1)
    assert found.token == 7 and found.logprob == pytest.approx(float(reference[7]))
    assert [i for i, _ in found.top] == reference.topk(3).indices.tolist()
