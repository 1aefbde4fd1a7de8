"""Prefill attention never takes SDPA's math path (which builds the n x n matrix): the kernel choice per
device and dtype, and both of its paths run on CPU with the math backend switched off."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastkv import FastKV, FullKV, adapter_for, layer, prefill

from .conftest import build_tiny, prompt_ids


@pytest.mark.parametrize(
    "device, dtype, repeat",
    [
        ("cuda", torch.float32, True),  # flash needs half precision; the efficient kernel takes no GQA
        ("cuda", torch.bfloat16, False),
        ("cuda", torch.float16, False),
        ("cpu", torch.float32, False),  # the CPU flash kernel takes GQA in every dtype
        ("cpu", torch.bfloat16, False),
    ],
)
def test_kernel_choice_per_device_and_dtype(device, dtype, repeat):
    assert layer.repeat_kv(torch.device(device), dtype) is repeat


@pytest.mark.parametrize("method", [FullKV(), FastKV(tsp_layer=1, tsp_len=40, budget=24)])
def test_both_paths_run_without_the_math_backend_and_agree(method, monkeypatch):
    adapter = adapter_for(build_tiny("qwen2"))
    ids = prompt_ids(96, seed=8)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the math path is off: a fallback would raise
        _, gqa, _ = prefill(adapter, ids, method)
        monkeypatch.setattr(layer, "repeat_kv", lambda device, dtype: True)
        _, repeated, _ = prefill(adapter, ids, method)
    torch.testing.assert_close(repeated, gqa, rtol=1e-5, atol=1e-5)
