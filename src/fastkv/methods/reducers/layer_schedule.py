"""PyramidInfer's layer-wise context reduction (Yang et al., 2024): https://arxiv.org/abs/2405.12532"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...scoring import top_with_window
from ..base import LayerState, Reducer, Selection, check_int, check_layer, check_rate, knob, share_of
from ..scorers.window import ObservationWindow


@dataclass(frozen=True, kw_only=True)
class LayerSchedule(ObservationWindow, Reducer):
    """Drop context from the residual stream every few layers, keeping a share that decays with depth.

    At layers start_layer, start_layer + interval, ... the tokens are ranked by the observation-window
    scores summed over heads, and the top max(min_len, L * decay^(s+1)) continue, s being the stage
    (0, 1, ...), with their hidden states and original positions. So prefill compute shrinks as a
    pyramid (with the `all` cache policy, the cache too). Unlike the paper, which re-selects the cache
    while decoding, the selection is made once, at prefill.
    """

    name = "schedule"

    start_layer: int = knob(2, "first layer that drops tokens")
    interval: int = knob(2, "layers between drops")
    decay: float = knob(0.8, "share of the prompt kept at each further drop, in (0, 1]")
    min_len: int = knob(256, "fewest tokens ever kept, window included: shorter prompts are not reduced")
    kernel_size: int = knob(1, "odd width of the pooling of scores along tokens")

    def check(self) -> None:
        super().check()
        check_int(self, "start_layer", minimum=0)
        check_int(self, "interval")
        check_rate(self, "decay")
        check_int(self, "min_len")
        if self.window_size > self.min_len:
            raise ValueError(f"LayerSchedule.window_size ({self.window_size}) is larger than min_len ({self.min_len})")

    def bind(self, num_layers: int, global_layers: Sequence[int] | None = None) -> LayerSchedule:
        check_layer(self, "start_layer", num_layers)
        return self

    def tail(self) -> int:
        return self.window_size

    def target(self, layer: int, prompt_len: int) -> int | None:
        """Tokens kept after `layer`, or None where the layer drops nothing."""
        if layer < self.start_layer or (layer - self.start_layer) % self.interval:
            return None
        stage = (layer - self.start_layer) // self.interval
        return max(self.min_len, share_of(self.decay ** (stage + 1), prompt_len))

    def tokens(self, layer: LayerState) -> Selection | None:
        target = self.target(layer.index, layer.prompt_len)
        if target is None or layer.present <= target:
            return None
        scores = layer.scores(self.window_scorer()).sum(dim=1)
        return Selection.same_for_all_heads(top_with_window(scores, target, self.window_size))
