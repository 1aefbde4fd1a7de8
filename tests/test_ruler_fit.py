"""`ruler.largest_fitting`: the size bisection finds, without tokenizing the huge sizes it used to probe."""

from __future__ import annotations

import random

import pytest

from fastkv.eval.ruler import FAR_OVER, largest_fitting


def plain_bisection(total, low: int, high: int, target: int) -> int:
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= target else (low, mid)
    return low


@pytest.mark.parametrize("seed", range(40))
def test_it_finds_bisections_size_and_probes_near_the_target_only(seed):
    rng = random.Random(seed)
    per_unit = rng.uniform(0.5, 30)  # tokens per haystack unit (a word, a line, a document)
    base = rng.randint(20, 300)  # the template, the question, the tokens to generate
    target = rng.randint(base + 50, 40_000)
    high = rng.choice((2_000, 20_000, 100_000, 400_000))
    probed = []

    def tokens(size: int) -> int:
        wobble = (size * 2654435761 + seed) % 7 % 3 - 1  # tokenization is not quite monotone
        return base + int(per_unit * size) + wobble

    def total(size: int) -> int:
        probed.append(size)
        return tokens(size)

    found = largest_fitting(total, 1, high, target, "test")
    assert found == plain_bisection(tokens, 1, high, target)
    assert tokens(found) <= target and (found + 1 == high or tokens(found + 1) > target)
    # nothing tokenized is far past the size that fits: doubling stops past FAR_OVER times the target
    assert max(probed) <= 2 * FAR_OVER * (found + 2) + 2, (max(probed), found)


def test_a_target_below_the_smallest_sample_is_an_error():
    with pytest.raises(ValueError, match="length=10 is too short for niah_single_1"):
        largest_fitting(lambda size: 50 + size, 1, 1000, 10, "niah_single_1")
