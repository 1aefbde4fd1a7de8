"""FastKV's Token-Selective Propagation (Jo et al., 2025): https://arxiv.org/abs/2502.01068"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ...scoring import top_with_window
from ..base import (
    MIN_TSP_LEN,
    TSP_RATE,
    LayerState,
    Reducer,
    Selection,
    check_exclusive,
    check_int,
    check_layer,
    knob,
    ranking_layer,
    sized,
)
from ..scorers.window import ObservationWindow


@dataclass(frozen=True, kw_only=True)
class TSP(ObservationWindow, Reducer):
    """Layers 0..tsp_layer see the whole prompt; only the most attended tokens continue after it.

    At tsp_layer the observation-window scores [B, Hkv, n - w] (`WindowAttention`, whose knobs this
    shares), summed over KV heads, rank the prompt: the top T - w tokens plus the window, in position
    order, continue to the later layers with their hidden states and original positions, so RoPE stays
    exact. One ranking for all heads: tokens move through the residual stream as a whole. A prompt of at
    most T tokens is not reduced; T from a rate is never below `min_tsp_len`.
    """

    name = "tsp"
    auto = {"tsp_layer": "layers//2-1"}

    tsp_layer: int | None = knob(None, "last layer on the full prompt (default: the paper's layers // 2 - 1)")
    tsp_rate: float | None = knob(None, "share of the prompt that continues past tsp_layer (default 0.2)")
    tsp_len: int | None = knob(None, "tokens that continue past tsp_layer, window included (instead of a rate)")
    min_tsp_len: int = knob(MIN_TSP_LEN, "fewest tokens a rate lets through: shorter prompts are not reduced")

    def check(self) -> None:
        super().check()
        check_exclusive(self, "tsp_rate", "tsp_len")
        check_int(self, "tsp_layer", minimum=0, allow_none=True)
        check_int(self, "min_tsp_len")
        if self.tsp_len is not None and self.tsp_len < self.window_size:
            raise ValueError(f"TSP.window_size ({self.window_size}) is larger than tsp_len ({self.tsp_len})")

    def bind(self, num_layers: int, global_layers: Sequence[int] | None = None) -> TSP:
        check_layer(self, "tsp_layer", num_layers)
        layer = ranking_layer(self, "tsp_layer", max(0, num_layers // 2 - 1), global_layers)
        rate = TSP_RATE if self.tsp_rate is None and self.tsp_len is None else self.tsp_rate
        return replace(self, tsp_layer=layer, tsp_rate=rate)

    def tail(self) -> int:
        return self.window_size

    def tsp_tokens(self, prompt_len: int) -> int:
        rate = TSP_RATE if self.tsp_rate is None else self.tsp_rate
        return sized(self.tsp_len, rate, prompt_len, max(self.window_size, self.min_tsp_len))

    def passed_on(self, prompt_len: int) -> int:
        return self.tsp_tokens(prompt_len)

    def tokens(self, layer: LayerState) -> Selection | None:
        if self.tsp_layer is None:
            raise RuntimeError("TSP.tsp_layer is unresolved: bind(num_layers) first")
        keep = self.tsp_tokens(layer.prompt_len)
        if layer.index != self.tsp_layer or layer.present <= keep:
            return None
        scores = layer.scores(self.window_scorer()).sum(dim=1)
        return Selection.same_for_all_heads(top_with_window(scores, keep, self.window_size))
