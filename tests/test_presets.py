"""The nine presets reproduce, bit for bit, what the methods selected and output before they became
compositions of a context reducer and a cache policy (fixtures recorded by tests/fixtures/record_presets.py).

Decode steps are the exception: since the cache became fixed-shape, a decode step attends over the layer's
whole buffer under a mask instead of a slice of it, which reorders float sums. Their logits must stay within
float rounding of the recorded ones (measured: 7e-7 of the largest) and pick the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from .fixtures.record_presets import CONFIGS, FAMILIES, PATH, run

RECORDED = torch.load(PATH)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_preset_reproduces_its_fixture(name, family):
    recorded, now = RECORDED[(name, family)], run(name, family)
    assert recorded.keys() == now.keys()
    for key in recorded.keys() - {"logits"}:
        assert equal(recorded[key], now[key]), key
    before, after = recorded["logits"], now["logits"]
    assert torch.equal(before[0], after[0])  # prefill's
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    assert (before - after).abs().max() <= 1e-5 * before.abs().max()


def test_fixtures_cover_every_preset():
    from fastkv.methods import PRESETS

    assert set(CONFIGS) == set(PRESETS)
    assert {n for n, _ in RECORDED} == set(PRESETS)
