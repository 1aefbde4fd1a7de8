"""The nine presets reproduce what the methods selected and output before they became compositions of a
context reducer and a cache policy (fixtures recorded by tests/fixtures/record_presets.py, on an AVX512-BF16
CPU).

Selections, positions, masks and sizes must match exactly: they are integers. Logits (prefill's and every
decode step's) are float32 sums whose rounding depends on the instruction set the kernels use (AVX-512,
AVX2, ...) and on summation order (a fixed-shape decode step attends over the whole buffer under a mask).
So they must match within LOGITS_TOLERANCE of the largest logit, and pick the same tokens.

Why 1e-4: measured against the fixtures, the largest difference is 7e-7 of the largest logit natively, 1e-6
with ATen forced to AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2) and 4.7e-6 with every kernel
forced down to SSE4.2 or ATen's default, so 1e-4 leaves 20x headroom over the worst ISA seen. A real
change of behaviour is far above it: the smallest gap between the best and second-best logit in these
fixtures is 9e-3 of the largest, and a different selection moves logits by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from .fixtures.record_presets import CONFIGS, FAMILIES, PATH, run

RECORDED = torch.load(PATH)
LOGITS_TOLERANCE = 1e-4  # of the largest logit; see the module docstring


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
    before, after = recorded["logits"], now["logits"]  # [1 + steps, B, V]: prefill's, then each decode step's
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    worst = float((before - after).abs().max() / before.abs().max())
    assert worst <= LOGITS_TOLERANCE, f"logits differ by {worst:.1e} of the largest"


def test_fixtures_cover_every_preset():
    from fastkv.methods import PRESETS

    assert set(CONFIGS) == set(PRESETS)
    assert {n for n, _ in RECORDED} == set(PRESETS)
