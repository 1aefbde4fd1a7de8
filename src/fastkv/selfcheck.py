"""Never silently wrong: before fastkv runs a model, a short prompt goes through its engine and through the
model's own forward, and their logits must agree (`check_against_model`; `LLM` runs it on every load).

An adapter describes a family's decoder block (`fastkv.adapters`); a model whose block computes something
the adapter does not know (a new scaling, a norm in another place, a variant of the family) would otherwise
give plausible but wrong text. The check feeds TOKENS tokens through prefill and one decode step, and compares
the last two positions' logits with the model's forward over the same tokens, relative to the largest logit:
within TOLERANCE for float32 weights and LOW_PRECISION_TOLERANCE for half precision or int8 weights (the two
paths sum in different orders). On a mismatch it says at which layer the hidden states first part.
"""

from __future__ import annotations

import torch

from .adapters import Adapter
from .decode import decode_step
from .engine import prefill
from .layer import PrefillOptions, layer_step
from .methods import FullKV

TOKENS = 16
TOLERANCE, LOW_PRECISION_TOLERANCE = 1e-3, 5e-2


class ModelMismatchError(ValueError):
    """fastkv's engine and the model's own forward disagree: the model is refused."""


def probe_ids(adapter: Adapter, n: int = TOKENS) -> torch.Tensor:
    """A fixed prompt [1, n] of token ids spread over the vocabulary."""
    vocab = adapter.embed_tokens.num_embeddings
    return ((torch.arange(n) * 7919 + 1009) % vocab).view(1, n).to(adapter.device)


def tolerance(adapter: Adapter) -> float:
    from .quantize import Int8Linear

    exact = adapter.dtype == torch.float32 and not isinstance(adapter.lm_head, Int8Linear)
    return TOLERANCE if exact else LOW_PRECISION_TOLERANCE


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


@torch.inference_mode()
def check_against_model(adapter: Adapter, name: str = "the model") -> float:
    """The engine's largest relative difference from the model's own logits on a short prompt, after checking
    it: ModelMismatchError, naming the first layer where they part, when it is above `tolerance`."""
    model, ids = adapter.model, probe_ids(adapter)
    n = ids.shape[1]
    theirs = model(ids, output_hidden_states=True, logits_to_keep=2)  # the output layer on two positions only
    ref = theirs.logits[:, -2:].float()
    cache, first, _ = prefill(adapter, ids[:, :-1], FullKV(), PrefillOptions(max_tokens=1))
    last = decode_step(adapter, cache, ids[0, -1:], n - 1)
    worst = max(relative(first, ref[:, 0]), relative(last, ref[:, 1]))
    bound = tolerance(adapter)
    if worst <= bound:
        return worst
    where = ""
    hidden = getattr(theirs, "hidden_states", None)
    if hidden is not None and len(hidden) == adapter.num_layers + 1:
        h, pos = adapter.embed(ids), torch.arange(n, device=ids.device).view(1, n)
        for i in range(adapter.num_layers - 1):  # the model's last entry may be after its final norm
            ((h, pos),) = layer_step(adapter, i, h, pos, n)
            gap = relative(h, hidden[i + 1])
            if gap > bound:
                where = f"; their hidden states first part after layer {i} (relative difference {gap:.2g})"
                break
    raise ModelMismatchError(
        f"fastkv's engine disagrees with {name}'s own forward on a {n}-token check: logits differ by {worst:.2g} "
        f"of the largest (at most {bound:g} is allowed){where}. Its {type(adapter).__name__} does not describe "
        f"this model's decoder block ({type(adapter.layers[0]).__name__}): fastkv refuses to run it"
    )
