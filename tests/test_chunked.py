"""Chunked prefill (attention and MLP over chunks of queries) gives what the unchunked prefill gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from fastkv import FullKV, PrefillOptions, adapter_for, decode_step, prefill
from fastkv.layer import layer_step
from fastkv.methods import format_spec, parse
from fastkv.shared import prefill_many

from .conftest import build_tiny, prompt_ids
from .fixtures.record_presets import CONFIGS
from .test_presets import equal

METHODS = [parse(name, knobs=knobs) for name, knobs in CONFIGS.items()]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("chunk", [7, 32])
def test_chunked_prefill_equals_unchunked(family, method, chunk):
    adapter = adapter_for(build_tiny(family))
    ids = prompt_ids(96, seed=21)
    cache, logits, trace = prefill(adapter, ids, method, PrefillOptions(max_tokens=2))
    c_cache, c_logits, c_trace = prefill(adapter, ids, method, PrefillOptions(max_tokens=2, prefill_chunk=chunk))
    assert close(c_logits, logits), (c_logits - logits).abs().max()
    # The same tokens continue and the same entries are cached: the selections did not move.
    assert c_trace.tokens_per_layer == trace.tokens_per_layer
    assert equal(c_trace.propagated, trace.propagated) and equal(c_cache.positions, cache.positions)
    for i in range(adapter.num_layers):
        n = cache.lengths[i]
        assert close(c_cache.keys[i][:, :, :n], cache.keys[i][:, :, :n])
        assert close(c_cache.values[i][:, :, :n], cache.values[i][:, :, :n])
    token = logits.argmax(-1)
    step = decode_step(adapter, cache, token, cache.position_base)
    assert close(decode_step(adapter, c_cache, token, c_cache.position_base), step)


@pytest.mark.parametrize("chunk", [1, 16])
def test_chunked_fullkv_matches_transformers(family, chunk):
    model = build_tiny(family)
    ids = prompt_ids(100, seed=4)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    _, logits, _ = prefill(adapter_for(model), ids, FullKV(), PrefillOptions(prefill_chunk=chunk))
    assert (logits - ref).abs().max() / ref.abs().max() < 1e-4


def test_shared_prefill_chunks_as_each_method_alone():
    adapter = adapter_for(build_tiny("qwen2"))
    ids = prompt_ids(96, seed=21)
    together = prefill_many(adapter, ids, METHODS, PrefillOptions(max_tokens=1, prefill_chunk=24))
    for method, (cache, logits, _) in zip(METHODS, together, strict=True):
        ref_cache, ref_logits, _ = prefill(adapter, ids, method, PrefillOptions(max_tokens=1, prefill_chunk=24))
        assert torch.equal(logits, ref_logits), format_spec(method)
        for k, ref_k, n in zip(cache.keys, ref_cache.keys, ref_cache.lengths, strict=True):
            assert torch.equal(k[:, :, :n], ref_k[:, :, :n])  # past n: room for decoding, not written


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_sizes_are_refused(bad):
    adapter = adapter_for(build_tiny("llama"))
    with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens"):
        prefill(adapter, prompt_ids(16), FullKV(), PrefillOptions(prefill_chunk=bad))
    with pytest.raises(ValueError, match="prefill_chunk"):
        prefill_many(adapter, prompt_ids(16), [FullKV()], PrefillOptions(prefill_chunk=bad))


def test_cli_names_the_option():
    from fastkv.cli import app

    result = CliRunner().invoke(app, ["generate", "--question", "hi", "--prefill-chunk", "0"])
    assert result.exit_code == 2 and "--prefill-chunk must be a positive number" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"max_tokens": -1}, "max_tokens must be a number of tokens >= 0"),
        ({"max_tokens": 2.0}, "max_tokens must be a number of tokens >= 0"),
        ({"max_tokens": True}, "max_tokens must be a number of tokens >= 0"),
        ({"prefill_chunk": 0}, "prefill_chunk must be a positive number"),
        ({"on_layer": 3}, "on_layer must be callable"),
        ({"on_chunk": "x"}, "on_chunk must be callable"),
    ],
)
def test_prefill_options_are_checked_when_built(knobs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PrefillOptions(**knobs)


def test_prefill_options_are_one_frozen_object_passed_whole():
    options = PrefillOptions(max_tokens=4, prefill_chunk=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_tokens = 5  # type: ignore[misc]
    adapter = adapter_for(build_tiny("llama"))
    with pytest.raises(TypeError, match="options must be a PrefillOptions"):
        prefill(adapter, prompt_ids(16), FullKV(), 4)  # the old positional max_new_tokens
    with pytest.raises(TypeError):
        prefill(adapter, prompt_ids(16), FullKV(), options, None)  # prefix and record are keyword-only
    h, pos = adapter.embed(prompt_ids(16)), torch.arange(16)[None]
    with pytest.raises(TypeError):
        layer_step(adapter, 0, h, pos, 16, None, options)  # options are keyword-only below the prompt
    cache, _, _ = prefill(adapter, prompt_ids(16), FullKV(), options)
    assert cache.max_tokens == 4 and cache.room == 4


def test_on_layer_and_on_chunk_are_called_from_the_options():
    adapter = adapter_for(build_tiny("llama"))
    layers, chunks = [], []
    options = PrefillOptions(prefill_chunk=5, on_layer=layers.append, on_chunk=chunks.append)
    prefill(adapter, prompt_ids(12), FullKV(), options)
    assert layers == list(range(adapter.num_layers))
    # per layer: projections, attention and MLP, each in chunks of 5, 5 and 2 tokens (the last layer attends
    # and runs its MLP for its last token only)
    assert chunks[:9] == [5, 5, 2] * 3 and sum(chunks) > 12 * 2 * adapter.num_layers
