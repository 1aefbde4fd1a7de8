"""Ragged batches: every sequence of a batch decodes as it would alone, for every preset."""

from __future__ import annotations

import json

import pytest
import torch

from fastkv import PrefillOptions, adapter_for, decode_step, generate, prefill
from fastkv.batch import DecodeBatch, Prefilled
from fastkv.cache import keep_rows, merge
from fastkv.generate import generate_batch
from fastkv.methods import parse
from fastkv.sampling import SamplingParams

from .conftest import build_tiny, prompt_ids
from .fixtures.record_presets import CONFIGS
from .test_generate import CharTokenizer

LENGTHS = (70, 130, 96)  # ragged, and not sorted
METHODS = [parse(name, knobs=knobs) for name, knobs in CONFIGS.items()]


def prompts() -> list[list[int]]:
    return [prompt_ids(n, seed=30 + n)[0].tolist() for n in LENGTHS]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_decode_logits_follow_solo_runs(family, method):
    adapter = adapter_for(build_tiny(family))
    solo = [prefill(adapter, torch.tensor([p]), method, PrefillOptions(max_tokens=4)) for p in prompts()]
    batch = merge([cache for cache, _, _ in solo])
    tokens = torch.stack([logits[0].argmax() for _, logits, _ in solo])
    for step in range(4):
        logits = decode_step(adapter, batch, tokens, batch.position_base + step)
        alone = torch.cat(
            [decode_step(adapter, c, tokens[b : b + 1], c.position_base + step) for b, (c, _, _) in enumerate(solo)]
        )
        assert torch.allclose(logits, alone, rtol=1e-4, atol=1e-5), (logits - alone).abs().max()
        tokens = alone.argmax(-1)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_generate_batch_returns_each_solo_answer(method):
    model = build_tiny("qwen3")
    batch = generate_batch(model, CharTokenizer(), prompts(), method, max_tokens=8)
    for prompt, result in zip(prompts(), batch, strict=True):
        alone = generate(model, CharTokenizer(), prompt, method, max_tokens=8)
        assert result.token_ids == alone.token_ids and result.text == alone.text
        assert result.finish_reason == alone.finish_reason == "length"
        assert result.stats.prompt_tokens == len(prompt) and result.stats.kv_bytes == alone.stats.kv_bytes
        assert result.stats.decode_steps == 7 and torch.equal(result.first_logits, alone.first_logits)


def test_rows_end_on_their_own_and_others_go_on():
    model = build_tiny("llama")
    method = parse("snapkv(budget=24)")
    free = [generate(model, CharTokenizer(), p, method, max_tokens=12).token_ids for p in prompts()]
    eos = free[1][3]  # the second sequence meets it early; the others may too, later or never
    tokenizer = CharTokenizer(eos=eos)
    ended = []
    batch = generate_batch(model, tokenizer, prompts(), method, max_tokens=12, on_result=lambda i, r: ended.append(i))
    assert batch[1].finish_reason == "eos" and len(batch[1].token_ids) <= 3
    assert ended[0] == 1 and sorted(ended) == [0, 1, 2]  # in the order they ended
    for prompt, result in zip(prompts(), batch, strict=True):
        alone = generate(model, tokenizer, prompt, method, max_tokens=12)
        assert (result.token_ids, result.finish_reason) == (alone.token_ids, alone.finish_reason)
    # stop strings and sampling with a seed, per row as alone
    stop = CharTokenizer().decode(free[0][4:6])
    options = dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=5)
    sampled = generate_batch(model, CharTokenizer(), prompts(), method, stop=[stop], **options)
    for prompt, result in zip(prompts(), sampled, strict=True):
        alone = generate(model, CharTokenizer(), prompt, method, stop=[stop], **options)
        assert (result.text, result.finish_reason) == (alone.text, alone.finish_reason)


def test_a_sequence_joins_a_running_batch():
    model = build_tiny("qwen2")
    adapter = adapter_for(model)
    method = parse("fastkv(tsp_layer=1, tsp_len=48, budget=24)").bind(adapter.num_layers)
    runner = DecodeBatch(model, CharTokenizer())
    results = {}
    for key, prompt in enumerate(prompts()):
        cache, logits, trace = prefill(adapter, torch.tensor([prompt]), method, PrefillOptions(max_tokens=10))
        assert runner.join(key, Prefilled(method, len(prompt), cache, logits, trace, 0.0), SamplingParams(10)) is None
        for _ in range(3):  # the earlier rows run ahead: the rows differ in steps taken
            results.update(runner.step())
    while runner.rows:
        results.update(runner.step())
    for key, prompt in enumerate(prompts()):
        assert results[key].token_ids == generate(model, CharTokenizer(), prompt, method, max_tokens=10).token_ids


def test_keep_rows_drops_rows_and_their_memory():
    adapter = adapter_for(build_tiny("llama"))
    method = parse("snapkv(budget=24)")
    solo = [prefill(adapter, torch.tensor([p]), method, PrefillOptions(max_tokens=3)) for p in prompts()]
    batch = keep_rows(merge([c for c, _, _ in solo]), [2, 0])
    assert batch.keys[0].shape[0] == 2 and batch.position_base.tolist() == [96, 70]
    token = torch.tensor([solo[2][1][0].argmax(), solo[0][1][0].argmax()])
    logits = decode_step(adapter, batch, token, batch.position_base)
    assert torch.allclose(logits[0], decode_step(adapter, solo[2][0], token[:1], 96)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge([])


def test_cli_batch_writes_jsonl_in_order(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from fastkv.cli import app

    prompts_file = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "word " * n, "id": f"p{n}"} for n in (300, 60, 150)]
    prompts_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_dir), "--batch", str(prompts_file), "--out", str(out), "-n", "5"]
    result = CliRunner().invoke(app, [*args, "--method", "snapkv(budget=64)"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p300", "p60", "p150"]
    # each answer is the one `fastkv generate` gives for that prompt alone (the chat template applies to both)
    single = CliRunner().invoke(
        app, ["generate", "--model", str(tiny_dir), "-q", "word " * 60, "-n", "5", "--method", "snapkv(budget=64)"]
    )
    assert single.exit_code == 0, single.output
    assert single.stdout.rstrip("\n") == rows[1]["text"]
    assert rows[0]["prompt_tokens"] > rows[2]["prompt_tokens"] > rows[1]["prompt_tokens"]
    assert all(r["new_tokens"] <= 5 and r["finish_reason"] in ("length", "eos") for r in rows)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    refused = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--batch", str(bad)])
    assert refused.exit_code == 2 and f'{bad}:2: expected an object with a non-empty string "prompt"' in refused.stderr
    both = CliRunner().invoke(app, [*args, "-q", "hi"])
    assert both.exit_code == 2 and "--batch takes its prompts from the file" in " ".join(both.stderr.split())
