"""A decode-time budget: the generated tokens' KV entries cut back, per layer and KV head, as they grow.

FastKV (arXiv 2502.01068) decouples prefill compute (TSP) from the prompt's KV budget. A long generation adds
a third cost: one entry per layer for every new token. `DecodeBudget` bounds it. Every `decode_interval` new
tokens, a layer holding more than `decode_budget` generated entries keeps the latest `decode_window` of them
and the best-scored of the rest (`decode_scorer`), per KV head, in place in the fixed-shape cache
(`fastkv.compaction`). A layer's buffer for generated tokens is therefore `decode_budget + decode_interval`
entries, however long the generation.

Only generated entries are evicted: the prompt's entries were already chosen by the cache policy with the
prompt's own observation window, and the prefix store and TSP's decisions rest on them. (A whole-cache
budget is `retain_rate`/`budget` for the prompt plus this for the rest.) Sliding-window layers are rings
already bounded by their window and are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..base import PARTS, Part, check_int, knob, knob_error

DECODE_INTERVAL, DECODE_WINDOW, DECODE_SCORER = 128, 16, "window"


@dataclass(frozen=True, kw_only=True)
class DecodeBudget(Part):
    """The cache policy's rule for generated tokens. decode_budget None (the default) keeps them all.

    Buffers: each non-sliding layer holds at most kept_prompt + decode_budget + decode_interval entries per KV
    head, [B, Hkv, that, d]; the scorer sees the queries of the latest steps, [B, Hq, its count, d]."""

    kind: ClassVar[str] = "decoding"
    name: ClassVar[str] = "budget"

    decode_budget: int | None = knob(None, "generated KV entries kept per layer and KV head (None: all of them)")
    decode_interval: int | None = knob(None, f"new tokens between cuts back to the budget (default {DECODE_INTERVAL})")
    decode_window: int | None = knob(None, f"latest generated entries always kept (default {DECODE_WINDOW}, at "
                                     "most the budget and the interval)")  # fmt: skip
    decode_scorer: str | None = knob(None, "how the other generated entries are ranked: window (the latest "
                                     "queries' attention), accumulated (all attention received, H2O) or redundancy "
                                     f"(R-KV) (default {DECODE_SCORER})")  # fmt: skip

    def check(self) -> None:
        if self.decode_budget is None:
            given = [k for k in ("decode_interval", "decode_window", "decode_scorer") if getattr(self, k) is not None]
            if given:
                raise knob_error(self, given[0], "does nothing without decode_budget: give decode_budget too")
            return
        check_int(self, "decode_budget")
        check_int(self, "decode_interval", allow_none=True)
        check_int(self, "decode_window", allow_none=True)
        if self.decode_scorer is not None and self.decode_scorer not in PARTS["decode_scorer"]:
            raise knob_error(
                self, "decode_scorer", f"must be one of {sorted(PARTS['decode_scorer'])}, got {self.decode_scorer!r}"
            )
        window, interval = self.window, self.interval
        if window > self.decode_budget:
            raise knob_error(self, "decode_window", f"({window}) is larger than decode_budget ({self.decode_budget})")
        if window > interval:
            # The scorer's queries must all come after the last cut, so that they saw exactly the entries
            # present now (`fastkv.compaction` relies on it).
            raise knob_error(self, "decode_window", f"({window}) is larger than decode_interval ({interval})")

    @property
    def active(self) -> bool:
        return self.decode_budget is not None

    @property
    def interval(self) -> int:
        return DECODE_INTERVAL if self.decode_interval is None else self.decode_interval

    @property
    def window(self) -> int:
        """decode_window, or by default 16, at most the budget and the interval."""
        if self.decode_window is not None:
            return self.decode_window
        return min(DECODE_WINDOW, self.decode_budget, self.interval)

    def bind(self, num_layers: int, global_layers=None) -> DecodeBudget:
        if not self.active:
            return self
        return replace(
            self,
            decode_interval=self.interval,
            decode_window=self.window,
            decode_scorer=DECODE_SCORER if self.decode_scorer is None else self.decode_scorer,
        )

    @property
    def held(self) -> int:
        """Generated entries a layer holds at most: the budget plus one interval's growth."""
        return self.decode_budget + self.interval

    def scorer(self):
        return PARTS["decode_scorer"][DECODE_SCORER if self.decode_scorer is None else self.decode_scorer]()
