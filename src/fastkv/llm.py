"""`LLM`: a loaded model and tokenizer, ready to generate under any method, with the model's profile."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .adapters import adapter_for
from .frontier import Frontier, check_spec
from .frontier import find as find_frontier
from .generate import generate, generate_batch, generate_many, is_batch, stream
from .methods import Method, parse
from .prefix import PrefixStore
from .profiles import PRESET, Profile, find, label
from .results import GenerationResult
from .sampling import SamplingParams
from .selfcheck import check_against_model


class LLM:
    """A loaded model and tokenizer, ready to generate under any method.

    >>> llm = LLM.load("qwen2.5-0.5b")
    >>> llm.generate(long_prompt, method="fastkv(tsp_rate=0.2, retain_rate=0.1)", max_tokens=64).text

    On a model with a calibrated profile, every `fastkv` knob left unset takes the profile's value, for a
    spec string and a preset object alike (`fastkv.profiles`); `result.stats.defaults` says which were in
    force. `llm.profile = None` gives the paper's defaults instead.
    """

    def __init__(self, model, tokenizer, name: str = "", prefix_cache_mib: float = 0, check: bool = True) -> None:
        """prefix_cache_mib: memory for a prefix store (`fastkv.prefix`): prompts that share a prefix with an
        earlier one (a document asked again, a chat's next turn) start from its stored state; 0: none.
        check: compare the engine with the model's own forward on a short prompt first, and refuse the model
        if they disagree (`fastkv.selfcheck`; ModelMismatchError)."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapter = adapter_for(model)  # fail early on an unsupported family
        if check:
            check_against_model(self.adapter, name or type(model).__name__)
        self.profile: Profile | None = find(name)
        self.frontier: Frontier | None = find_frontier(name)  # what `fastkv(max_loss=...)` chooses from
        self.prefix_cache: PrefixStore | None = None
        self.use_prefix_cache(prefix_cache_mib)

    def use_prefix_cache(self, mib: float) -> PrefixStore | None:
        """A new prefix store of `mib` MiB (0: none). Its entries keep residuals where the default FastKV
        propagates, so that a FastKV follow-up can continue from any method's entry."""
        if isinstance(mib, bool) or not isinstance(mib, (int, float)) or not mib >= 0:
            raise ValueError(f"prefix_cache_mib must be a number >= 0, got {mib!r}")
        self.prefix_cache = None
        if mib > 0:
            tsp_layer = getattr(self.resolve()[0].reducer, "tsp_layer", None)
            mids = frozenset() if tsp_layer is None else frozenset({tsp_layer})
            self.prefix_cache = PrefixStore(int(mib * 2**20), mids)
        return self.prefix_cache

    @classmethod
    def load(
        cls,
        name: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        progress: bool = True,
        quantize: str = "auto",
        prefix_cache_mib: float = 0,
    ) -> LLM:
        """A model by name (`fastkv.models.load`), by default in the precision measured fastest on this
        machine (`fastkv info`: bfloat16 + int8 weights where bfloat16 is native, float32 + int8 where it
        is not); `quantize="none"` keeps the dtype's weights."""
        from .models import DEFAULT_MODEL, load

        name = name or DEFAULT_MODEL
        model, tokenizer = load(name, dtype=dtype, device=device, progress=progress, quantize=quantize)
        return cls(model, tokenizer, name, prefix_cache_mib)

    @property
    def precision(self) -> str:
        """The dtype the model computes in, with "+int8" where its linears hold int8 weights."""
        from .quantize import Int8Linear

        dtype = str(self.adapter.dtype).removeprefix("torch.")
        return dtype + ("+int8" if isinstance(self.adapter.lm_head, Int8Linear) else "")

    def resolve(self, method: Method | str | None = None, **knobs) -> tuple[Method, str]:
        """The method bound to this model (its profile's defaults applied), and where FastKV's defaults came
        from: the profile's description, "paper", or "" for a method that has no `fastkv` side.
        knobs: set apart from the spec, as a command's options (`spec.parse`)."""
        method = method if method is not None else PRESET
        if isinstance(method, str) and "max_loss" in method:
            return self._within(method, knobs)
        profile = {PRESET: self.profile.knobs} if self.profile is not None else None
        chosen = self.adapter.bind(parse(method, knobs=knobs, preset_defaults=profile))
        recipe = chosen.recipe or ()
        if not recipe or recipe[0][0] != PRESET:
            return chosen, ""
        return chosen, self.profile.source if self.profile is not None else "paper"

    def _within(self, spec: str, knobs: dict) -> tuple[Method, str]:
        """`fastkv(max_loss=...)`: the fastest FastKV setting of the model's frontier within the bound, and a
        source that names it with its measured loss (`fastkv.frontier`)."""
        import warnings

        rest, bound = check_spec(spec, knobs)
        if self.frontier is None:
            note = f"{label(self.name or 'this model')} has no measured frontier (`fastkv eval frontier`)"
            warnings.warn(f"{note}: max_loss={bound} cannot be honoured; running the paper's fastkv", stacklevel=3)
            return self.adapter.bind(parse(rest)), f"paper ({note}; max_loss={bound} not applied)"
        setting = self.frontier.pick(bound)
        where = f"frontier {label(self.frontier.model)} ({self.frontier.suite})"
        source = f"{where}, max_loss={bound}: {setting.describe()}"
        return self.adapter.bind(parse(setting.spec)), source

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
        method: Method | str | None = None,
        sampling: SamplingParams | None = None,
        **options,
    ) -> GenerationResult | list[GenerationResult]:
        """A GenerationResult for a prompt (text or token ids); for a list of prompts, a list of them, in
        order, decoded together as one ragged batch (`generate_batch`, whose on_result it takes).
        Options: sampling fields (max_tokens, temperature, ...) unless `sampling` is given; chat, on_text,
        on_layer, prefill_chunk, compile."""
        chosen, source = self.resolve(method)
        many = is_batch(prompt)
        run = generate_batch if many else generate
        results = run(self.model, self.tokenizer, prompt, chosen, sampling, prefix_cache=self.prefix_cache, **options)
        for result in results if many else [results]:
            result.stats.defaults = source
        return results

    def stream(
        self, prompt: str | Sequence[int], method: Method | str | None = None, sampling=None, **options
    ) -> Iterator[str]:
        """The text piece by piece (`fastkv.generate.stream`); the generator's return value is the result."""
        chosen, source = self.resolve(method)
        options.setdefault("prefix_cache", self.prefix_cache)
        result = yield from stream(self.model, self.tokenizer, prompt, chosen, sampling, **options)
        result.stats.defaults = source
        return result

    def generate_many(
        self, prompt: str | Sequence[int], methods: Sequence[Method | str], sampling=None, **options
    ) -> list[GenerationResult]:
        """One result per method from one shared prefill (`fastkv.generate.generate_many`)."""
        chosen = [self.resolve(m) for m in methods]
        results = generate_many(self.model, self.tokenizer, prompt, [m for m, _ in chosen], sampling, **options)
        for result, (_, source) in zip(results, chosen, strict=True):
            result.stats.defaults = source
        return results

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])
