"""GemFilter's filter-and-rerun (Shi et al., 2024): https://arxiv.org/abs/2409.17422"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ...scoring import top_with_window
from ..base import (
    MIN_BUDGET,
    RETAIN_RATE,
    CachePolicy,
    LayerState,
    Pass,
    Passes,
    PrefillTrace,
    Reducer,
    Selection,
    check_exclusive,
    check_int,
    check_layer,
    knob,
    ranking_layer,
    sized,
)
from ..scorers.last_query import LastQuery
from .none import NoReduction


@dataclass(frozen=True, kw_only=True)
class FilterRerun(Reducer):
    """Use an early layer as a filter, then run the whole model again on the tokens it selects.

    Layers 0..filter_layer run on the prompt of L tokens. At filter_layer the last-query scores
    (`LastQuery`) pick the top `budget` tokens, the last `window_size` always
    among them; in order, they form a new prompt with positions renumbered 0..budget-1, which the model
    runs from scratch, and decoding continues at position `budget`. Budgets of the cache policy stay
    relative to L. A prompt of at most `budget` tokens runs once, unfiltered.
    """

    name = "filter"
    auto = {"filter_layer": "round(13/32*layers)"}

    filter_layer: int | None = knob(None, "the filter layer (default: the paper's 13 of 32 layers, scaled)")
    window_size: int = knob(1, "last prompt tokens always selected (generation continues from them)")
    kernel_size: int = knob(5, "odd width of the average pooling of scores along tokens")
    budget: int | None = knob(None, "tokens selected, window included (instead of a rate)")
    retain_rate: float | None = knob(None, "tokens selected, as a share of the prompt (default 0.1)")
    min_budget: int = knob(MIN_BUDGET, "fewest tokens a rate selects: shorter prompts are not filtered")

    def check(self) -> None:
        self.scorer()  # checks window_size and kernel_size
        check_int(self, "filter_layer", minimum=0, allow_none=True)
        check_exclusive(self, "retain_rate", "budget")
        check_int(self, "min_budget")
        if self.budget is not None and self.budget < self.window_size:
            raise ValueError(f"FilterRerun.window_size ({self.window_size}) is larger than budget ({self.budget})")

    def bind(self, num_layers: int, global_layers: Sequence[int] | None = None) -> FilterRerun:
        check_layer(self, "filter_layer", num_layers)
        layer = ranking_layer(self, "filter_layer", min(num_layers - 1, round(13 * num_layers / 32)), global_layers)
        rate = RETAIN_RATE if self.retain_rate is None and self.budget is None else self.retain_rate
        return replace(self, filter_layer=layer, retain_rate=rate)

    def scorer(self) -> LastQuery:
        return LastQuery(window_size=self.window_size, kernel_size=self.kernel_size)

    def tail(self) -> int:
        return self.window_size

    def keep(self, prompt_len: int) -> int:
        """Tokens the filter selects from a prompt of prompt_len tokens."""
        rate = RETAIN_RATE if self.retain_rate is None else self.retain_rate
        return sized(self.budget, rate, prompt_len, max(self.window_size, self.min_budget))

    def passed_on(self, prompt_len: int) -> int:
        return self.keep(prompt_len)  # the rerun: every layer sees only these

    def tokens(self, layer: LayerState) -> Selection | None:
        keep = self.keep(layer.prompt_len)
        if layer.index != self.filter_layer or layer.present <= keep:
            return None
        scores = layer.scores(self.scorer()).sum(dim=1)
        return Selection.same_for_all_heads(top_with_window(scores, keep, self.window_size))

    def prefill(self, passes: Passes, input_ids: torch.Tensor, policy: CachePolicy) -> Pass:
        """The filter (layers 0..filter_layer on the whole prompt, caching nothing), then a whole pass on the
        selected tokens alone, renumbered, with the policy's budgets of the whole prompt."""
        prompt_len = input_ids.shape[1]
        if prompt_len <= self.keep(prompt_len):  # nothing to filter: one ordinary pass
            return passes.run(input_ids, NoReduction(), policy)
        selected = self.tokens(passes.look(input_ids, self.filter_layer))
        # At the filter layer every token is present at its own position, so indices are positions.
        chosen = selected.indices[:, 0]
        second = passes.run(input_ids.gather(1, chosen), NoReduction(), policy.for_prompt(prompt_len))
        second.cache.prompt_len = prompt_len  # KV shares are of the whole prompt; decoding goes on at len(chosen)
        layers = self.filter_layer + 1  # what the filter ran: these layers on the whole prompt, then it chose
        filtered = PrefillTrace(prompt_len, [prompt_len] * layers, {self.filter_layer: chosen})
        trace = RerunTrace(**{**vars(second.trace), "prompt_len": prompt_len}, filter=filtered)
        return Pass(second.cache, second.logits, trace)


@dataclass
class RerunTrace(PrefillTrace):
    """The rerun's trace, with the filter's: `filter.propagated[filter_layer]` holds the original positions
    [B, T] of the tokens the rerun ran on (renumbered 0..T-1 there)."""

    filter: PrefillTrace | None = None
