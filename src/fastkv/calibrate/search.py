"""`fastkv calibrate MODEL`: find the FastKV settings that fit a model, and record them as a profile.

Two stages over the calibration prompts (`prompts.py`, built offline, independent of RULER):

1. **Recall, for every setting at once.** One full prefill per prompt, under a reducer that only
   observes (`Observe`): at every candidate TSP layer it ranks the tokens as TSP would for every
   window, kernel, pooling and rate of the grid, and records the share of the answer's tokens that would
   continue; at every layer it records the share that the cache policy would keep. Layers before TSP see
   the full prompt, so these are exactly the selections FastKV would make.
2. **Fidelity, for the best few.** The settings with the highest recall that meet the prefill speedup
   (predicted at 8K tokens from per-layer costs measured on this machine) run for real, together with
   FullKV and SnapKV in one shared prefill per prompt (`generate_many`): greedy answer agreement with
   FullKV, first-token KL, and whether the answer is right.

The best-fidelity setting that meets `min_speedup` becomes the profile. Work is saved after every prompt
and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..chat import encode_rendered, has_template, render_chat
from ..engine import prefill
from ..eval.metrics import first_token_kl
from ..layer import layer_step
from ..methods import Composed, FastKV, LayerState, Reducer, Selection, SnapKV, format_spec
from ..methods.base import MIN_TSP_LEN, sized
from ..methods.registry import TSP, KeepAll, TopK, WindowAttention
from .prompts import LENGTHS, PER_KIND, prompt_set

KERNELS, POOLINGS, WINDOWS, RATES = (7, 11, 13, 17), ("max", "avg"), (8, 16), (0.1, 0.2, 0.3)
SPEED_AT = 8192  # the prompt length the speedup is predicted for
ANSWER_TOKENS = 40  # room for the longest answer (a UUID is about 30 tokens where digits are tokens)


@dataclass(frozen=True)
class Setting:
    tsp_layer: int
    kernel_size: int
    pooling: str
    window_size: int
    tsp_rate: float

    def method(self, retain_rate: float) -> FastKV:
        return FastKV(**asdict(self), retain_rate=retain_rate)


def grid(num_layers: int, ranking_layers: list[int] | None = None) -> list[Setting]:
    """TSP layers from the paper's (layers // 2 - 1) to 3 before the end, every other one (on a hybrid model,
    its global layers before the last: TSP ranks the prompt there, `methods.base.ranking_layer`); the grid's
    knobs."""
    start = max(0, num_layers // 2 - 1)
    layers = range(start, max(start + 1, num_layers - 2), 2)
    if ranking_layers is not None:
        layers = [i for i in ranking_layers if i < num_layers - 1]
    return [Setting(*s) for s in itertools.product(layers, KERNELS, POOLINGS, WINDOWS, RATES)]


@dataclass(frozen=True, kw_only=True)
class Observe(Reducer):
    """Reduces nothing; records, for each candidate setting, which answer tokens TSP would let through."""

    name = "observe"
    settings: tuple[Setting, ...]
    answer: tuple[int, ...]  # token positions of the answer in the prompt
    retain_rate: float
    found: dict = field(default_factory=dict, compare=False)

    def tokens(self, layer: LayerState) -> Selection | None:
        """Ask the real parts what they would pick here: FastKV's cache policy for every window, kernel and
        pooling, and TSP for every setting whose TSP layer this is (scores are computed once per scorer)."""
        answer = torch.tensor(self.answer, device=layer.k.device)

        def recall(chosen: Selection | None) -> float:  # None: every token stays
            return 1.0 if chosen is None else float(torch.isin(answer, chosen.indices[0]).float().mean())

        for w, k, pool in {(s.window_size, s.kernel_size, s.pooling) for s in self.settings}:
            scorer = WindowAttention(window_size=w, kernel_size=k, pooling=pool)
            kept = TopK(scorer=scorer, retain_rate=self.retain_rate).entries(layer)
            if kept is not None:  # what the cache policy keeps, over all heads
                self.found[f"cache/{layer.index}/{w}/{k}/{pool}"] = recall(kept)
            for s in self.settings:
                if (s.tsp_layer, s.window_size, s.kernel_size, s.pooling) == (layer.index, w, k, pool):
                    tsp = TSP(tsp_layer=s.tsp_layer, window_size=w, kernel_size=k, pooling=pool, tsp_rate=s.tsp_rate)
                    self.found[key(s)] = recall(tsp.tokens(layer))
        return None


def key(s: Setting) -> str:
    return f"tsp/{s.tsp_layer}/{s.window_size}/{s.kernel_size}/{s.pooling}/{s.tsp_rate}"


def answer_positions(tokenizer, text: str, answer: str) -> tuple[int, ...]:
    """Token positions of the answer's (last) occurrence in the rendered prompt."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.rindex(answer)
    end = start + len(answer)
    return tuple(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start)


@torch.inference_mode()
def layer_costs(adapter, sizes: list[int], repeats: int = 2) -> dict[int, float]:
    """Seconds of one decoder layer (projections, attention, MLP) on n tokens, for each n (median)."""
    middle, costs = len(adapter.layers) // 2, {}
    for n in sorted(set(sizes)):
        h = torch.randn(1, n, adapter.embed_tokens.weight.shape[1], dtype=adapter.dtype, device=adapter.device)
        pos = torch.arange(n, device=adapter.device)[None]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer_step(adapter, middle, h, pos, n)
            times.append(time.perf_counter() - start)
        costs[n] = statistics.median(times)
    return costs


def tsp_tokens(s: Setting, length: int = SPEED_AT) -> int:
    return sized(None, s.tsp_rate, length, max(s.window_size, MIN_TSP_LEN))


def predicted_speedup(s: Setting, costs: dict[int, float], num_layers: int) -> float:
    """FullKV's prefill over FastKV's at SPEED_AT tokens: full layers up to tsp_layer, then T tokens."""
    full = costs[SPEED_AT]
    fast = (s.tsp_layer + 1) * full + (num_layers - s.tsp_layer - 1) * costs[tsp_tokens(s)]
    return num_layers * full / fast


class Work:
    """Results so far, one JSON line per prompt and stage, in a file keyed by what would change them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.rows[(row["stage"], row["prompt"])] = row
        path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, stage: int, prompt: int) -> dict | None:
        return self.rows.get((stage, prompt))

    def put(self, row: dict) -> None:
        self.rows[(row["stage"], row["prompt"])] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def work_path(root: Path, model: str, config: dict) -> Path:
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return root / "calibrate" / f"{model.replace('/', '_')}-{digest}.jsonl"


def calibrate(
    llm,
    model: str,
    work_root: Path,
    retain_rate: float = 0.1,
    min_speedup: float = 1.6,
    candidates: int = 4,
    per_kind: int = PER_KIND,
    lengths: tuple[int, ...] = LENGTHS,
    on_step=None,
) -> dict:
    """Run both stages (resuming from `work_root`) and return the profile record."""
    adapter, tokenizer = llm.adapter, llm.tokenizer
    n_layers = adapter.num_layers
    settings = grid(n_layers, adapter.ranking_layers)
    paper_layer = adapter.bind(FastKV()).reducer.tsp_layer  # the paper's, or the global layer nearest it
    paper = Setting(paper_layer, 7, "max", 8, 0.2)
    lengths = tuple(min(n, adapter.max_positions - ANSWER_TOKENS) for n in lengths)  # room for the answer
    prompts = prompt_set(tokenizer, lengths, per_kind)
    config = {
        "retain_rate": retain_rate,
        "settings": len(settings),
        "prompts": [p.text for p in prompts],
        "dtype": str(adapter.dtype),
        "version": 1,
    }
    work = Work(work_path(work_root, model, config))
    started = time.time()

    costs = layer_costs(adapter, [SPEED_AT, *(tsp_tokens(s) for s in settings)])
    speed = {key(s): predicted_speedup(s, costs, n_layers) for s in settings}

    for i, p in enumerate(prompts):  # stage 1: recall of every setting
        if work.get(1, i) is None:
            chat = has_template(tokenizer)  # a base model's prompt goes in as it is, as `generate` sends it
            text = render_chat(tokenizer, p.text) if chat else p.text
            ids = torch.tensor([encode_rendered(tokenizer, text) if chat else tokenizer(text)["input_ids"]],
                               device=adapter.device)  # fmt: skip
            observe = Observe(
                settings=tuple(settings), answer=answer_positions(tokenizer, text, p.answer), retain_rate=retain_rate
            )
            prefill(adapter, ids, Composed(reducer=observe, policy=KeepAll()))
            work.put(
                {
                    "stage": 1,
                    "prompt": i,
                    "kind": p.kind,
                    "haystack": p.haystack,
                    "tokens": ids.shape[1],
                    "recall": observe.found,
                }
            )
        if on_step:
            on_step()

    def recall(s: Setting) -> tuple[float, float, float]:
        rows = [work.get(1, i) for i in range(len(prompts))]
        values = [r["recall"][key(s)] for r in rows]
        cache = [
            v
            for r in rows
            for k, v in r["recall"].items()
            if k.startswith("cache/") and k.endswith(f"/{s.window_size}/{s.kernel_size}/{s.pooling}")
        ]
        return statistics.mean(values), sum(v == 1.0 for v in values) / len(values), statistics.mean(cache or [1.0])

    eligible = [s for s in settings if speed[key(s)] >= min_speedup]
    # Ties go to the cheaper setting by structure (earlier TSP layer, lower rate), not by measured time,
    # so that a rerun on the same machine picks the same finalists.
    ranked = sorted(eligible, key=lambda s: (*recall(s), -s.tsp_layer, -s.tsp_rate), reverse=True)
    finalists = list(dict.fromkeys([*ranked[:candidates], paper]))
    methods = [SnapKV(retain_rate=retain_rate), *(s.method(retain_rate) for s in finalists)]
    specs = [format_spec(adapter.bind(m)) for m in methods]

    for i, p in enumerate(prompts):  # stage 2: fidelity of the finalists (and SnapKV, for reference)
        row = work.get(2, i)
        if row is None or row.get("max_new_tokens") != ANSWER_TOKENS:
            row = {"stage": 2, "prompt": i, "answer": p.answer, "max_new_tokens": ANSWER_TOKENS, "results": {}}
        missing = [m for m, spec in zip(methods, specs, strict=True) if spec not in row["results"]]
        if missing:
            full, *results = llm.generate_many(p.text, ["fullkv", *missing], max_tokens=ANSWER_TOKENS)
            row["fullkv"] = full.text
            for r in results:
                row["results"][r.method] = {
                    "text": r.text,
                    "agrees": r.text.strip() == full.text.strip(),
                    "correct": p.answer in r.text,
                    "kl": first_token_kl(full.first_logits, r.first_logits),
                }
            work.put(row)
        if on_step:
            on_step()

    table = []
    for spec, s in zip(specs, [None, *finalists], strict=True):  # None: SnapKV
        rows = [work.get(2, i)["results"][spec] for i in range(len(prompts))]
        entry = {
            "spec": spec,
            "agreement": statistics.mean(r["agrees"] for r in rows),
            "correct": statistics.mean(r["correct"] for r in rows),
            "first_token_kl": statistics.mean(r["kl"] for r in rows),
        }
        if s is not None:
            mean_recall, full_recall, cache_recall = recall(s)
            entry.update(
                setting=asdict(s),
                tsp_recall=mean_recall,
                tsp_full_recall=full_recall,
                cache_recall=cache_recall,
                predicted_speedup_8k=round(speed[key(s)], 2),
            )
        table.append(entry)
    contenders = [e for e in table[1:] if e["predicted_speedup_8k"] >= min_speedup]
    best = max(contenders, key=lambda e: (e["agreement"], e["correct"], -e["first_token_kl"]))
    return {
        "model": model,
        "knobs": best["setting"],
        "chosen": best,
        "snapkv": table[0],
        "finalists": table[1:],
        "retain_rate": retain_rate,
        "min_speedup": min_speedup,
        "layer_costs_s": {str(n): round(c, 4) for n, c in costs.items()},
        "prompts": len(prompts),
        "grid": {
            "tsp_layers": sorted({s.tsp_layer for s in settings}),
            "kernel_size": KERNELS,
            "pooling": POOLINGS,
            "window_size": WINDOWS,
            "tsp_rate": RATES,
        },
        "created": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - started, 1),
    }
