"""Text generation on top of the engine: sampling, stop strings, EOS, chat template, streaming, stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .adapters import adapter_for
from .cache import KVCache
from .engine import PrefillTrace, decode_step, prefill
from .methods import FastKV, Method, make_method


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


def encode_prompt(tokenizer, prompt: str | Sequence[int], chat: bool) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True, but this tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else nucleus sampling from logits [V]."""
    if temperature == 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string (or an unfinished character)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def stream(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    method: Method | str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = False,
    on_layer: Callable[[int], None] | None = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    ignore_eos: bool = False,
) -> Iterator[str]:
    """Yield the generated text piece by piece; the generator's return value is a GenerationResult.

    `method` is a Method or a spec string such as "fastkv(kernel_size=13)" (default: FastKV()).
    prefill_chunk: queries per attention and MLP chunk in prefill, to bound its memory (`prefill`).
    compile: decode under torch.compile (the first call compiles, for tens of seconds).
    ignore_eos: go on past EOS to max_new_tokens (benchmarks want fixed lengths).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    parts = adapter_for(model)
    method = make_method(method if method is not None else FastKV()).bind(parts.num_layers)
    ids = encode_prompt(tokenizer, prompt, chat)
    prefilled = prefill_prompt(parts, ids, method, max_new_tokens, prefill_chunk, on_layer)
    options = (max_new_tokens, temperature, top_p, seed, stop, compile, ignore_eos)
    return (yield from _decode(model, tokenizer, parts, prefilled, *options))


def prefill_prompt(
    parts, ids: Sequence[int], method: Method, max_new_tokens: int, chunk_size: int | None = None, on_layer=None
) -> Prefilled:
    """Prefill one prompt's token ids under a bound method, timed: what decoding starts from."""
    start = _now(parts.device)
    input_ids = torch.tensor([list(ids)], device=parts.device)
    cache, logits, trace = prefill(parts, input_ids, method, max_new_tokens, on_layer=on_layer, chunk_size=chunk_size)
    return Prefilled(method, len(ids), cache, logits, trace, _now(parts.device) - start)


def generate_many(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    methods: Sequence[Method | str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = False,
    prefill_chunk: int | None = None,
    compile: bool = False,
) -> list[GenerationResult]:
    """One result per method, as `generate` would give for each alone, from one shared prefill
    (`fastkv.shared.prefill_many`). Each result's prefill_seconds is the shared prefill's time."""
    from .shared import prefill_many

    check_sampling(max_new_tokens, temperature, top_p)
    parts = adapter_for(model)
    bound = [make_method(m).bind(parts.num_layers) for m in methods]
    ids = encode_prompt(tokenizer, prompt, chat)
    start = _now(parts.device)
    prefilled = prefill_many(parts, torch.tensor([ids], device=parts.device), bound, max_new_tokens, prefill_chunk)
    seconds = _now(parts.device) - start
    results = []
    for method, (cache, logits, trace) in zip(bound, prefilled, strict=True):
        done = Prefilled(method, len(ids), cache, logits, trace, seconds, shared_by=len(bound))
        options = (max_new_tokens, temperature, top_p, seed, stop, compile)
        results.append(_drain(_decode(model, tokenizer, parts, done, *options)))
    return results


@dataclass
class Prefilled:
    """What decoding starts from."""

    method: Method  # bound
    prompt_tokens: int
    cache: KVCache
    logits: torch.Tensor
    trace: PrefillTrace
    seconds: float
    shared_by: int = 1


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _drain(pieces: Generator[str, None, GenerationResult], on_text: Callable[[str], None] | None = None):
    while True:
        try:
            piece = next(pieces)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(piece)


class Transcript:
    """The text of one sequence's generated tokens, ended by EOS or cut at the first stop string."""

    def __init__(self, tokenizer, eos: set[int], stop: Sequence[str]) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, eos, [s for s in stop if s]
        self.out: list[int] = []
        self.text, self.emitted, self.finish = "", 0, "length"

    def add(self, token: int) -> bool:
        """Take the next token; False once the sequence has ended (this token was EOS or made a stop string)."""
        if token in self.eos:
            self.finish = "eos"
            return False
        self.out.append(token)
        self.text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"
            return False
        return True

    def ready(self, final: bool = False) -> str:
        """Text not emitted yet that no later token can change (all of it when final)."""
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted += len(piece)
        return piece


def _result(p: Prefilled, t: Transcript, kv: tuple[int, int, list[int]], decode_seconds: float, steps: int):
    """The result of a finished sequence; kv: the cache's bytes after prefill, a full cache's, entries per layer."""
    return GenerationResult(
        text=t.text,
        token_ids=t.out,
        finish_reason=t.finish,
        method=p.method.spec,
        first_logits=p.logits[0],
        stats=GenerationStats(
            method=p.method.spec,
            prompt_tokens=p.prompt_tokens,
            new_tokens=len(t.out),
            prefill_seconds=p.seconds,
            decode_seconds=decode_seconds,
            decode_steps=steps,
            kv_entries_per_layer=kv[2],
            tokens_per_layer=p.trace.tokens_per_layer,
            kv_bytes=kv[0],
            kv_bytes_full=kv[1],
            prefill_shared_by=p.shared_by,
        ),
    )


def _decode(
    model,
    tokenizer,
    parts,
    p: Prefilled,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    compile: bool = False,
    ignore_eos: bool = False,
) -> Generator[str, None, GenerationResult]:
    """Sample from the prefill's logits, then decode step by step until EOS, a stop string or the limit."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=parts.device).manual_seed(seed)
    transcript = Transcript(tokenizer, set() if ignore_eos else eos_ids(model, tokenizer), stop)
    cache, logits = p.cache, p.logits
    kv = cache.nbytes(), cache.full_nbytes(), cache.kept_per_layer
    steps = 0
    start = _now(parts.device)
    for step in range(max_new_tokens):
        if step:
            token_ids = torch.tensor([transcript.out[-1]], device=parts.device)
            logits = decode_step(parts, cache, token_ids, cache.position_base + step - 1, compiled=compile)
            steps += 1
        if not transcript.add(sample(logits[0], temperature, top_p, generator)):
            break
        if piece := transcript.ready():
            yield piece
    decode_seconds = _now(parts.device) - start
    if piece := transcript.ready(final=True):
        yield piece
    return _result(p, transcript, kv, decode_seconds, steps)


def generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    method: Method | str | None = None,
    on_text: Callable[[str], None] | None = None,
    **options,
) -> GenerationResult:
    """Generate a completion of `prompt` under `method` (default: FastKV with the paper's settings).

    Options: max_new_tokens, temperature (0 = greedy), top_p, seed, stop (strings), chat (apply the
    tokenizer's chat template), on_layer (prefill progress callback), prefill_chunk (queries per chunk in
    prefill, to bound its memory on long prompts), compile (decode under torch.compile), ignore_eos (go on
    past EOS to max_new_tokens). `on_text` receives text as it is produced (streaming).
    """
    return _drain(stream(model, tokenizer, prompt, method, **options), on_text)


def is_batch(prompt) -> bool:
    """A list of prompts (texts or token-id lists), not one prompt given as token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)


class LLM:
    """A loaded model and tokenizer, ready to generate under any method.

    >>> llm = LLM.load("qwen2.5-0.5b")
    >>> llm.generate(long_prompt, method="fastkv(tsp_rate=0.2, retain_rate=0.1)").text

    A method given as a spec string (or no method: "fastkv") takes the model's calibrated profile, if it
    has one, as the defaults of the `fastkv` preset; `result.stats.defaults` says which were in force.
    """

    def __init__(self, model, tokenizer, name: str = "") -> None:
        from .calibrate.profiles import find

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.parts = adapter_for(model)  # fail early on an unsupported family
        self.profile = find(name)

    @classmethod
    def load(
        cls,
        name: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        progress: bool = True,
        quantize: str = "auto",
    ) -> LLM:
        """A model by name (`fastkv.models.load`), by default in the device's dtype with int8 weights where
        they decode faster (bfloat16 on CPU; `quantize="none"` keeps the dtype's weights)."""
        from .models import DEFAULT_MODEL, load

        name = name or DEFAULT_MODEL
        model, tokenizer = load(name, dtype=dtype, device=device, progress=progress, quantize=quantize)
        return cls(model, tokenizer, name)

    @property
    def precision(self) -> str:
        """The dtype the model computes in, with "+int8" where its linears hold int8 weights."""
        from .quantize import Int8Linear

        dtype = str(self.parts.dtype).removeprefix("torch.")
        return dtype + ("+int8" if isinstance(self.parts.lm_head, Int8Linear) else "")

    def method(self, method: Method | str | None = None, **knobs) -> tuple[Method, str]:
        """The method a spec means for this model, and where FastKV's defaults came from."""
        from .calibrate.profiles import PRESET
        from .methods.spec import uses_defaults

        spec = method if method is not None else PRESET
        if not uses_defaults(spec, PRESET):
            return make_method(spec, **knobs), ""
        if self.profile is None:
            return make_method(spec, **knobs), "paper"
        return make_method(spec, defaults={PRESET: self.profile.knobs}, **knobs), self.profile.source

    def generate(self, prompt, method: Method | str | None = None, **options):
        """A GenerationResult for a prompt (text or token ids); for a list of prompts, a list of them, in order,
        decoded together as one ragged batch (`fastkv.batch.generate_batch`; options then take on_result)."""
        if is_batch(prompt):
            from .batch import generate_batch

            chosen, source = self.method(method)
            results = generate_batch(self.model, self.tokenizer, prompt, chosen, **options)
            for result in results:
                result.stats.defaults = source
            return results
        return _drain(
            self.stream(prompt, method, **{k: v for k, v in options.items() if k != "on_text"}), options.get("on_text")
        )

    def stream(self, prompt: str | Sequence[int], method: Method | str | None = None, **options) -> Iterator[str]:
        chosen, source = self.method(method)
        result = yield from stream(self.model, self.tokenizer, prompt, chosen, **options)
        result.stats.defaults = source
        return result

    def generate_many(self, prompt: str | Sequence[int], methods: Sequence[Method | str], **options):
        """One result per method from one shared prefill; see `generate_many`."""
        chosen = [self.method(m) for m in methods]
        results = generate_many(self.model, self.tokenizer, prompt, [m for m, _ in chosen], **options)
        for result, (_, source) in zip(results, chosen, strict=True):
            result.stats.defaults = source
        return results

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])
