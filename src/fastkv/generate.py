"""Generation on any transformers model: `stream`, `generate`, `generate_many`, `generate_batch`.

All four prefill with the engine and decode with the one decode loop (`fastkv.batch.DecodeBatch`): a
single prompt is a batch of one row. Sampling is a `SamplingParams` (or its fields as keyword options).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence

import torch

from .adapters import adapter_for
from .batch import DecodeBatch, Prefilled, clock, decode_alone, prefill_prompt, raised
from .chat import encode_prompt, is_conversation
from .layer import PrefillOptions
from .methods import FastKV, Method, parse
from .prefix import PrefixStore
from .results import GenerationResult
from .sampling import SamplingParams
from .shared import prefill_many


def stream(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    method: Method | str | None = None,
    sampling: SamplingParams | None = None,
    *,
    chat: bool | None = None,
    on_layer: Callable[[int], None] | None = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    prefix_cache: PrefixStore | None = None,
    **options,
) -> Iterator[str]:
    """Yield the generated text piece by piece; the generator's return value is a GenerationResult.

    `method` is a Method or a spec string such as "fastkv(kernel_size=13)" (default: FastKV()).
    sampling: a SamplingParams, or its fields as options (max_tokens=64, temperature=0.7, ...).
    chat: apply the tokenizer's chat template to a text prompt; None (the default): where it has one, as the
        CLI does (an instruct model gets its chat format, a base model plain text). on_layer(i): prefill progress.
    prefill_chunk: queries per attention and MLP chunk in prefill, to bound its memory (`prefill`).
    compile: decode under torch.compile (the first call compiles: tens of seconds, minutes for int8 weights on
        a CPU, which are frozen into the graph as a second, repacked copy and decode 1.5-2x faster).
    prefix_cache: start from the longest prefix of the prompt stored there, and store this one (`fastkv.prefix`).
    """
    params = SamplingParams.of(sampling, options)
    adapter = adapter_for(model)
    method = adapter.bind(parse(method if method is not None else FastKV()))
    ids = encode_prompt(tokenizer, prompt, chat)
    options = PrefillOptions(params.max_tokens, prefill_chunk, on_layer)
    prefilled = prefill_prompt(adapter, ids, method, options, prefix_cache=prefix_cache)
    return (yield from decode_alone(model, tokenizer, prefilled, params, compile))


def generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    method: Method | str | None = None,
    sampling: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
    **options,
) -> GenerationResult:
    """Generate a completion of `prompt` under `method` (default: FastKV with the paper's settings); the
    options are `stream`'s. `on_text` receives text as it is produced (streaming)."""
    return drain(stream(model, tokenizer, prompt, method, sampling, **options), on_text)


def drain(pieces: Generator[str, None, GenerationResult], on_text: Callable[[str], None] | None = None):
    """Run a generator of text pieces to its end; its return value (a result)."""
    while True:
        try:
            piece = next(pieces)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(piece)


def generate_many(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    methods: Sequence[Method | str],
    sampling: SamplingParams | None = None,
    *,
    chat: bool | None = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    **options,
) -> list[GenerationResult]:
    """One result per method, as `generate` would give for each alone, from one shared prefill
    (`fastkv.shared.prefill_many`). Each result's prefill_seconds is the shared prefill's time."""
    params = SamplingParams.of(sampling, options)
    adapter = adapter_for(model)
    bound = [adapter.bind(parse(m)) for m in methods]
    ids = encode_prompt(tokenizer, prompt, chat)
    start = clock(adapter.device)
    input_ids = torch.tensor([ids], device=adapter.device)
    prefilled = prefill_many(adapter, input_ids, bound, PrefillOptions(params.max_tokens, prefill_chunk))
    seconds = clock(adapter.device) - start
    results = []
    for method, (cache, logits, trace) in zip(bound, prefilled, strict=True):
        done = Prefilled(method, len(ids), cache, logits, trace, seconds, shared_by=len(bound))
        results.append(drain(decode_alone(model, tokenizer, done, params, compile)))
    return results


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    method: Method | str | None = None,
    sampling: SamplingParams | None = None,
    *,
    chat: bool | None = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    on_result: Callable[[int, GenerationResult], None] | None = None,
    prefix_cache: PrefixStore | None = None,
    **options,
) -> list[GenerationResult]:
    """One result per prompt, in order: each prompt prefilled alone, then all decoded as one ragged batch.

    Each sequence's tokens are those `generate` gives it alone (greedy: the same; sampled with a seed: the
    same draws, each row with its own generator). Its decode_seconds is the time it spent decoding in the
    batch, which it shared with the other rows. on_result(index, result) is called as each sequence ends.
    """
    params = SamplingParams.of(sampling, options)
    adapter = adapter_for(model)
    method = adapter.bind(parse(method if method is not None else FastKV()))
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    batch = DecodeBatch(model, tokenizer, compile)
    results: list[GenerationResult | None] = [None] * len(prompts)

    def finished(index: int, result: GenerationResult | Exception) -> None:
        results[index] = result = raised(result)
        if on_result is not None:
            on_result(index, result)

    for index, ids in enumerate(encoded):
        options = PrefillOptions(params.max_tokens, prefill_chunk)
        prefilled = prefill_prompt(adapter, ids, method, options, prefix_cache=prefix_cache)
        done = batch.join(index, prefilled, params)
        if done is not None:
            finished(index, done)
    while batch.rows:
        for index, result in batch.step():
            finished(index, result)
    return results  # type: ignore[return-value]


def is_batch(prompt) -> bool:
    """A list of prompts (texts, token-id lists or conversations), not one prompt given as token ids or as a
    conversation (messages)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and not isinstance(prompt[0], int)
        and not is_conversation(prompt)
    )
