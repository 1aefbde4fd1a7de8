"""The generation API: greedy equals transformers, streaming, stop strings, EOS, sampling, stats."""

from __future__ import annotations

import math

import pytest
import torch

from fastkv import FastKV, FullKV, SnapKV, generate, stream

from .conftest import build_tiny, prompt_ids


class CharTokenizer:
    """One token per character (code point mod 128): enough to exercise text handling offline."""

    chat_template = None

    def __init__(self, eos: int | None = None) -> None:
        self.eos_token_id = eos

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 58) for i in ids)


PROMPT = prompt_ids(64, seed=7)[0].tolist()


@pytest.fixture(scope="module")
def model():
    return build_tiny("llama")


def test_greedy_matches_transformers_generate(model):
    result = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=20)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones_like(torch.tensor([PROMPT])),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )
    assert result.token_ids == ref[0, 64:].tolist()
    assert result.finish_reason == "length"
    assert result.text == CharTokenizer().decode(result.token_ids)


def test_streamed_pieces_make_the_text(model):
    pieces = []
    result = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=12, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == result.text


def test_stop_string_cuts_the_text(model):
    full = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=20).text
    stop = full[6:9]
    cut = full[: full.find(stop)]
    pieces = list(stream(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=20, stop=[stop]))
    result = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=20, stop=[stop])
    assert result.finish_reason == "stop" and result.text == cut
    assert "".join(pieces) == cut  # nothing of the stop string leaked into the stream


def test_eos_ends_generation(model):
    tokens = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=20).token_ids
    eos = tokens[5]
    result = generate(model, CharTokenizer(eos=eos), PROMPT, FullKV(), max_tokens=20)
    assert result.finish_reason == "eos"
    assert result.token_ids == tokens[: tokens.index(eos)]
    past = generate(model, CharTokenizer(eos=eos), PROMPT, FullKV(), max_tokens=20, ignore_eos=True)
    assert past.finish_reason == "length" and past.token_ids == tokens  # EOS kept as a token, not an end


def test_sampling_is_seeded(model):
    def run(seed, **kw):
        return generate(
            model, CharTokenizer(), PROMPT, FullKV(), max_tokens=16, temperature=1.0, seed=seed, **kw
        ).token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=16).token_ids
    assert run(3, top_p=1e-6) == greedy  # a nucleus of one token is greedy


def test_stats_report_the_compression(model):
    result = generate(
        model,
        CharTokenizer(),
        prompt_ids(200)[0].tolist(),
        FastKV(tsp_layer=1, tsp_len=100, budget=40),
        max_tokens=4,
    )
    s = result.stats
    assert s.prompt_tokens == 200 and s.new_tokens == 4
    assert s.tokens_per_layer == [200, 200, 100, 100]
    assert s.kv_entries_per_layer == [40] * 4
    assert s.kv_bytes * 5 == s.kv_bytes_full
    assert s.prefill_seconds > 0 and s.decode_tokens_per_s > 0 and s.decode_steps == 3
    assert s.method == result.method and s.method.startswith("fastkv(") and "tsp_layer=1" in s.method


def test_eos_as_the_first_token(model):
    first = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=4).token_ids[0]
    pieces = []
    result = generate(model, CharTokenizer(eos=first), PROMPT, FullKV(), max_tokens=4, on_text=pieces.append)
    assert result.finish_reason == "eos" and result.text == "" and result.token_ids == [] and pieces == []
    s = result.stats
    assert s.new_tokens == 0 and s.decode_steps == 0 and math.isnan(s.decode_tokens_per_s)


def test_decode_rate_counts_the_step_that_produced_eos(model):
    tokens = generate(model, CharTokenizer(), PROMPT, FullKV(), max_tokens=8).token_ids
    result = generate(model, CharTokenizer(eos=tokens[3]), PROMPT, FullKV(), max_tokens=8)
    # tokens 1..3 and the EOS came from decode steps; token 0 from prefill
    assert result.stats.new_tokens == 3 and result.stats.decode_steps == 3
    assert result.stats.decode_tokens_per_s == 3 / result.stats.decode_seconds


def test_spec_strings_generate_like_their_methods(model):
    by_spec = generate(model, CharTokenizer(), PROMPT, "snapkv(budget=24)", max_tokens=6)
    by_object = generate(model, CharTokenizer(), PROMPT, SnapKV(budget=24), max_tokens=6)
    assert by_spec.token_ids == by_object.token_ids and by_spec.method == by_object.method


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"chat": True}, "chat template"),
    ],
)
def test_bad_generation_options_raise(model, options, message):
    with pytest.raises(ValueError, match=message):
        generate(model, CharTokenizer(), "some text", SnapKV(), **options)
