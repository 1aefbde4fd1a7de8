"""The fixed-shape decode step: the same buffers and shapes at every step, a mask of what is written,
per-sequence slots and positions, and a compiled step equal to the eager one."""

from __future__ import annotations

import pytest
import torch

from fastkv import FullKV, PrefillOptions, SnapKV, adapter_for, decode_step, prefill
from fastkv.methods import parse

from .conftest import build_tiny, prompt_ids


def test_decode_keeps_its_buffers_and_shapes():
    adapter = adapter_for(build_tiny("qwen2"))
    cache, logits, _ = prefill(adapter, prompt_ids(80), SnapKV(budget=24), PrefillOptions(max_tokens=5))

    def buffers():
        layers = zip(cache.keys, cache.values, cache.attend, strict=True)
        return [(k.data_ptr(), k.shape, v.data_ptr(), m.data_ptr(), m.shape) for k, v, m in layers]

    before = buffers()
    for step in range(5):
        logits = decode_step(adapter, cache, logits.argmax(-1), cache.position_base + step)
        assert buffers() == before
        for i in range(adapter.num_layers):
            # the 24 prefill entries and one per step so far, nothing beyond
            assert cache.attend[i].sum(-1).tolist() == [[24 + step + 1] * adapter.num_kv_heads]
            assert cache.slots[i].tolist() == [24 + step + 1]
    assert cache.lengths == [24 + 5] * adapter.num_layers
    with pytest.raises(RuntimeError, match="the KV cache is full: it was sized for max_tokens=5"):
        decode_step(adapter, cache, logits.argmax(-1), cache.position_base + 5)


def test_a_batch_decodes_each_sequence_as_alone():
    # Two prompts in one batch, each at its own position: every row equals that sequence decoded alone.
    adapter = adapter_for(build_tiny("llama"))
    ids = torch.cat([prompt_ids(64, seed=3), prompt_ids(64, seed=4)])
    cache, logits, _ = prefill(adapter, ids, FullKV(), PrefillOptions(max_tokens=3))
    solo = [prefill(adapter, ids[b : b + 1], FullKV(), PrefillOptions(max_tokens=3)) for b in range(2)]
    shift = torch.tensor([0, 7])  # positions may differ per sequence (a ragged batch's do)
    for step in range(3):
        tokens = logits.argmax(-1)
        logits = decode_step(adapter, cache, tokens, 64 + step + shift)
        for b, (c, _, _) in enumerate(solo):
            alone = decode_step(adapter, c, tokens[b : b + 1], 64 + step + int(shift[b]))
            assert torch.allclose(logits[b], alone[0], rtol=1e-5, atol=1e-5)


def eager_and_compiled(adapter, ids: torch.Tensor, method, steps: int):
    """Two caches prefilled alike, then decoded greedily on the eager one's tokens, one step eagerly and one
    compiled: yields (eager logits, compiled logits, the eager cache, the compiled cache) per step."""
    n = ids.shape[1]
    eager, logits, _ = prefill(adapter, ids, method, PrefillOptions(max_tokens=steps))
    compiled, _, _ = prefill(adapter, ids, method, PrefillOptions(max_tokens=steps))
    for step in range(steps):
        token = logits.argmax(-1)
        logits = decode_step(adapter, eager, token, n + step)
        yield logits, decode_step(adapter, compiled, token, n + step, compiled=True), eager, compiled


def test_compiled_decode_equals_eager():
    adapter = adapter_for(build_tiny("qwen2"))
    method = parse("adakv(budget=24)")  # padded heads: the mask matters
    for n in (96, 130):  # another capacity: the same compiled graph (dynamic shapes)
        for logits, fast, eager, compiled in eager_and_compiled(adapter, prompt_ids(n), method, 3):
            assert torch.allclose(fast, logits, rtol=1e-4, atol=1e-5), (fast - logits).abs().max()
            assert compiled.slots[0].tolist() == eager.slots[0].tolist()


def test_compiled_decode_under_a_decode_budget_equals_eager():
    """The compiled step writes the query ring too; the cuts between steps see the same queries."""
    adapter = adapter_for(build_tiny("qwen2"))
    method = parse("adakv(budget=24, decode_budget=4, decode_interval=2, decode_window=1)")  # cuts at 6 and 8
    caches = []
    for logits, fast, eager, compiled in eager_and_compiled(adapter, prompt_ids(96), method, 9):
        assert torch.allclose(fast, logits, rtol=1e-4, atol=1e-5), (fast - logits).abs().max()
        caches = [eager, compiled]
    eager, compiled = caches
    assert compiled.decode_state.evicted == eager.decode_state.evicted != [0]
    assert compiled.slots[0].tolist() == eager.slots[0].tolist()


def test_compiled_decode_freezes_each_models_own_int8_weights():
    # Compiled decoding on int8 weights freezes them into the graph. Two models of the same shapes must each
    # decode with their own: a graph reused with the first one's constants would match the first model.
    from fastkv.decode import frozen_decode
    from fastkv.quantize import quantize_int8

    method, n, outputs = parse("snapkv(budget=24)"), 96, []
    for seed in (1, 2):
        model = build_tiny("qwen2")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        quantize_int8(model)
        adapter = adapter_for(model)
        assert frozen_decode(adapter)
        for logits, fast, _, _ in eager_and_compiled(adapter, prompt_ids(n), method, 3):
            # Both round the rows to bfloat16 for an int8 kernel; eager also rounds each linear's output to
            # bfloat16, the compiled template keeps its float32 sums (0.04-0.06 apart on logits near 5).
            assert (fast - logits).abs().max() < 0.15, (fast - logits).abs().max()
            assert fast.argmax(-1).tolist() == logits.argmax(-1).tolist()
        outputs.append(logits)
    assert (outputs[0] - outputs[1]).abs().max() > 1  # the two models do differ
    # A batch takes the plain compiled step (the frozen one fails to compile a dynamic batch in torch 2.13).
    ids = torch.cat([prompt_ids(64, seed=3), prompt_ids(64, seed=4)])
    for logits, fast, _, _ in eager_and_compiled(adapter, ids, method, 2):
        assert torch.allclose(fast, logits, rtol=1e-4, atol=1e-4), (fast - logits).abs().max()
    # ... and one sequence after a batch is frozen again, as a server alternates between them.
    for logits, fast, _, _ in eager_and_compiled(adapter, prompt_ids(n), method, 1):
        assert (fast - logits).abs().max() < 0.15


@pytest.mark.parametrize(
    "name", ["fullkv", "snapkv", "fastkv", "pyramidkv", "adakv", "gemfilter", "streamingllm", "h2o", "pyramidinfer"]
)
def test_policies_bound_their_cache_before_prefill(name):
    # What a server reserves before prefill is never less than what prefill then caches.
    from .fixtures.record_presets import CONFIGS

    adapter = adapter_for(build_tiny("qwen2"))
    method = parse(name, knobs=CONFIGS[name]).bind(adapter.num_layers)
    for n in (20, 96, 200):
        cache, _, _ = prefill(adapter, prompt_ids(n, seed=n), method)
        for i, kept in enumerate(cache.kept_per_layer):
            assert kept <= method.policy.max_entries(n, i, adapter.num_layers, adapter.num_kv_heads), (n, i)
