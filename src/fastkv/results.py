"""What a generation returns: the text, its tokens, why it ended, and what prefill and decoding cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationStats:
    method: str  # the canonical spec, every knob resolved for this model
    prompt_tokens: int
    new_tokens: int  # tokens returned (an EOS that ended generation is not one)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # decode_step calls timed in decode_seconds (an EOS produced by one counts)
    kv_entries_per_layer: list[int]  # entries each layer kept at prefill, per KV head
    tokens_per_layer: list[int]  # tokens each layer computed on during prefill
    kv_bytes: int  # bytes of the cache after prefill
    kv_bytes_full: int  # bytes an uncompressed cache of the prompt takes
    prefill_shared_by: int = 1  # methods that one shared prefill served (generate_many); its time is theirs
    defaults: str = ""  # where FastKV's defaults came from: "paper", or the model's calibrated profile
    prefix_tokens_reused: int = 0  # prompt tokens whose prefill state came from the prefix store
    kv_evicted: int = 0  # generated entries a decode budget evicted, summed over layers and KV heads
    kv_bytes_end: int = 0  # bytes of the cache at the last step: the prompt's entries and the generated ones held

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second; NaN when no step ran (the first token comes from prefill's logits)."""
        return (
            self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else float("nan")
        )

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_full


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    stats: GenerationStats
    method: str = field(default="")
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # float32 [V]: the prompt's last position
    logprobs: list | None = field(default=None, repr=False)  # a TokenLogprob per token, when asked for
