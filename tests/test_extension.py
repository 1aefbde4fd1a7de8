"""A new scorer and a new allocator, written here, reach the spec strings, the listing and the test matrix
through one registry line each: no engine, CLI or matrix code of their own."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from fastkv.cli import app
from fastkv.methods import format_spec, parse
from fastkv.methods.base import PARTS, Allocator, Scorer, check_rate, knob

from .matrix import COMPRESSING, check_invariants, combinations, compose


@dataclass(frozen=True, kw_only=True)
class KeyNorm(Scorer):
    """Keys with a small L2 norm draw attention (Devoto et al., 2024, arXiv 2406.11430): score -|k|.

    q [B, Hq, n, d], k [B, Hkv, n, d] -> [B, Hkv, n - window_size]. No query is needed.
    """

    name = "keynorm"
    observes = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return -k[:, :, : -self.window_size].float().norm(dim=-1)


@dataclass(frozen=True, kw_only=True)
class EvenOdd(Allocator):
    """Even layers keep (1 + skew) times the prefix budget, odd layers (1 - skew) times: same mean."""

    name = "evenodd"

    skew: float = knob(0.5, "share moved from odd layers to even ones, in (0, 1]")

    def check(self) -> None:
        check_rate(self, "skew")

    def layer_budget(self, budget: int, window: int, layer: int, num_layers: int) -> int:
        prefix = budget - window
        return window + round(prefix * (1 + self.skew if layer % 2 == 0 else 1 - self.skew))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PARTS["scorer"], KeyNorm.name, KeyNorm)  # the one registry line, for a test
    monkeypatch.setitem(PARTS["allocator"], EvenOdd.name, EvenOdd)


def test_the_matrix_picks_up_new_parts(registered):
    new = [c for c in combinations() if "keynorm" in c[0] or "evenodd" in c[0]]
    # every reducer x (keynorm with each allocator, and each scorer with evenodd)
    assert len(new) == len(PARTS["reducer"]) * (len(PARTS["allocator"]) + len(PARTS["scorer"]) - 1)
    for _, reducer, policy in new:
        check_invariants(compose(reducer, policy, COMPRESSING), "qwen2")


def test_new_parts_in_spec_strings(registered):
    method = parse("fastkv(tsp_layer=1)+topk(scorer=keynorm, allocator=evenodd, skew=0.25, budget=24)")
    assert method.policy.allocator.skew == 0.25 and type(method.policy.scorer) is KeyNorm
    again = parse(format_spec(method.bind(4)))
    assert again.same_parts(method.bind(4))
    with pytest.raises(ValueError, match=r"skew must be in \(0, 1\]"):
        parse("topk(allocator=evenodd, skew=2)")


def test_new_parts_are_listed(registered):
    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "scorer keynorm:" in result.output and "allocator evenodd:" in result.output
    assert any(line.split()[:3] == ["skew", "=", "0.5"] for line in result.output.splitlines() if line.strip())
