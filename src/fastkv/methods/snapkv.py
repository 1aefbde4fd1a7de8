"""SnapKV (Li et al., 2024): https://arxiv.org/abs/2404.14469"""

from __future__ import annotations

from dataclasses import dataclass

from .base import TopKWindow, WindowScored


@dataclass(kw_only=True)
class SnapKV(TopKWindow, WindowScored):
    """Keep the KV entries that the observation window attends to most, per layer and KV head.

    Prefill runs on the full prompt (it is not faster); the cache of every layer shrinks to the budget,
    which makes decoding faster and smaller. Per layer, with queries q_w [B, Hq, w, d] of the last
    `window_size` tokens and keys K [B, Hkv, L, d]:
      scores = GQA-sum(pool(sum_w softmax(q_w K^T))) -> [B, Hkv, L - w]
    and each KV head keeps its top `budget - window_size` prefix entries plus the window.

    Unlike the FastKV paper's SnapKV baseline, which repeats K/V to every query head before selecting
    (storing Hq/Hkv times more), this one selects per KV head: the GQA-aware variant.

    Args:
        budget: KV entries kept per layer and head (window included). Exclusive with retain_rate.
        retain_rate: budget as a share of the prompt length, in (0, 1]. Default 0.1.
        window_size: observation window, in tokens.
        kernel_size: odd width of the pooling along tokens.
        pooling: "max" or "avg".
    """

    name = "snapkv"
    reduces = "KV cache"
    paper = "https://arxiv.org/abs/2404.14469"

    def __post_init__(self) -> None:
        self.check_window()
        self.check_budget()
