"""`layer.layer_step`, the one function that runs a layer: over the tokens present, and over the later tokens
of a prompt after the earlier ones' K/V (`past`), which must give those tokens exactly what the whole
prompt gives them (causal attention: a token never sees what follows it)."""

from __future__ import annotations

import pytest
import torch

from fastkv import PrefillOptions, adapter_for
from fastkv.engine import layer_step, open_layer

from .conftest import build_tiny, prompt_ids


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_later_tokens_after_the_earlier_ones_kv_equal_the_whole_prompt(family, chunk):
    adapter = adapter_for(build_tiny(family))
    ids, split = prompt_ids(40, seed=4), 29
    n = ids.shape[1]
    h, pos = adapter.embed(ids), torch.arange(n)[None]
    with torch.inference_mode():
        for i in range(adapter.num_layers):
            ((whole, _),) = layer_step(adapter, i, h, pos, n, options=PrefillOptions(prefill_chunk=chunk))
            earlier = open_layer(adapter, i, h[:, :split], pos[:, :split], n)
            past = (earlier.k, earlier.v, earlier.positions)
            ((later, later_pos),) = layer_step(
                adapter, i, h[:, split:], pos[:, split:], n, past=past, options=PrefillOptions(prefill_chunk=chunk)
            )
            assert torch.equal(later_pos, pos[:, split:])
            torch.testing.assert_close(later, whole[:, split:], rtol=1e-5, atol=1e-5)
            h = whole


def test_the_parts_see_every_token_present_with_past():
    adapter = adapter_for(build_tiny("llama"))
    ids = prompt_ids(20)
    seen = []
    with torch.inference_mode():
        h, pos = adapter.embed(ids), torch.arange(20)[None]
        earlier = open_layer(adapter, 0, h[:, :12], pos[:, :12], 20)
        past = (earlier.k, earlier.v, earlier.positions)
        layer_step(adapter, 0, h[:, 12:], pos[:, 12:], 20, decide=lambda s: seen.append(s) or [None], past=past)
    (state,) = seen
    assert state.k.shape[2] == state.v.shape[2] == 20 and state.q.shape[2] == 8  # keys of all, queries of the new
    assert state.positions[0].tolist() == list(range(20)) and state.present == 20


def test_a_layer_whose_decision_continues_nothing_skips_its_attention():
    adapter = adapter_for(build_tiny("llama"))
    ids = prompt_ids(16)
    with torch.inference_mode():
        h, pos = adapter.embed(ids), torch.arange(16)[None]
        assert layer_step(adapter, 0, h, pos, 16, decide=lambda s: []) == []
        two = layer_step(adapter, 0, h, pos, 16, decide=lambda s: [None, torch.tensor([[1, 5, 15]])])
    assert two[0][0].shape == (1, 16, 64) and two[1][0].shape == (1, 3, 64)
    torch.testing.assert_close(two[1][0], two[0][0][:, [1, 5, 15]])  # the MLP works per token
    assert two[1][1].tolist() == [[1, 5, 15]]
