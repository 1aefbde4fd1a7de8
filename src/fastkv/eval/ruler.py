"""RULER's 13 synthetic tasks (Hsieh et al., 2024, arXiv 2404.06654), generated offline and reproducibly.

Each sample is a deterministic function of (task, target length in the model's tokens, seed, index).
Templates, answer prefixes, generation lengths and metrics follow RULER's; the haystacks come from the
installed data packages (see `fastkv.eval.data`). The target length counts, as RULER's does, the
formatted prompt plus the tokens to generate; the haystack is sized by bisection so that a sample lands
within 2% under the target.
"""

from __future__ import annotations

import hashlib
import random
import string
import uuid
from dataclasses import asdict, dataclass, field
from functools import cache

from ..chat import has_template, render_chat
from . import data, metrics

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
    "dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 insertion depths, in percent

NIAH = {
    # name: (haystack, key type, value type, keys, values per key, queries)
    "niah_single_1": ("repeat", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
TASKS = [*NIAH, "vt", "cwe", "fwe", "qa_1", "qa_2"]


@dataclass
class Sample:
    task: str
    index: int
    input: str  # the task text, for the user turn
    answer_prefix: str  # starts the answer (after the chat template's assistant header)
    outputs: list[str]  # references
    max_tokens: int
    metric: str  # "string_match_all" or "string_match_part"
    length: int = 0  # formatted prompt tokens + max_tokens
    # niah: each needle, its intended depth (0..1), and the haystack units (sentences or lines) before it
    needles: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def family(task: str) -> str:
    if task in NIAH:
        return "niah"
    if task.startswith("qa_"):
        return "qa"
    return task


def rng_for(*parts) -> random.Random:
    """A generator seeded by a stable hash (Python's str hash is salted per process)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- vocabularies -------------------------------------------------------------------------------


@cache
def _adjectives_nouns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(data.word_list("adjective")))), tuple(sorted(set(data.word_list("noun"))))


@cache
def plain_words() -> tuple[str, ...]:
    return tuple(sorted(set(data.word_list("noun") + data.word_list("adjective") + data.word_list("verb"))))


@cache
def essay_sentences(words: int) -> tuple[str, ...]:
    """The first `words` words of the essays, split into sentences (RULER sizes haystacks in words)."""
    return tuple(data.sentences(" ".join(data.essay_words()[:words])))


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":  # RULER's "adjective-noun" keys, drawn uniformly over the pairs
        adjectives, nouns = _adjectives_nouns()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# ---- the generators: (rng, size) -> (input, answer_prefix, outputs, needles) ----------------------


def niah(task: str, rng: random.Random, size: int):
    haystack, type_k, type_v, num_k, num_v, num_q = NIAH[task]
    num_k = max(num_k, num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(random_value(rng, type_k))
        values.append([random_value(rng, type_v) for _ in range(num_v)])
        needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if haystack == "essay":
        sents = list(essay_sentences(size))
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        cuts = [int(len(sents) * d / 100) for d in depths]
        pieces, last = [], 0
        for cut, needle in zip(cuts, needles, strict=True):
            pieces += sents[last:cut] + [needle]
            last = cut
        context = " ".join(pieces + sents[last:])
        placed = [
            {"needle": n, "depth": d / 100, "before": cut, "units": len(sents)}
            for n, d, cut in zip(needles, depths, cuts, strict=True)
        ]
    else:
        if haystack == "repeat":
            lines = [REPEAT] * size
        else:
            lines = [
                NEEDLE.format(type_needle_v=type_v, key=random_value(rng, type_k), value=random_value(rng, type_v))
                for _ in range(size)
            ]
        slots = sorted(rng.sample(range(size + 1), len(needles)))
        placed = []
        for offset, (slot, needle) in enumerate(zip(slots, needles, strict=True)):
            lines.insert(slot + offset, needle)
            placed.append({"needle": needle, "depth": slot / max(size, 1), "before": slot, "units": size})
        context = "\n".join(lines)
    chosen = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in chosen]
    outputs = [v for i in chosen for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, noun = NIAH_TEMPLATE, NIAH_PREFIX, type_v
    if num_q * num_v == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
        noun = noun[:-1]
    text = template.format(type_needle_v=noun, context=context, query=query)
    return text, prefix.format(type_needle_v=noun, query=query), outputs, placed


def vt_example(rng: random.Random, noises: int, hops: int = 4) -> tuple[str, list[str], str]:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    lines = [REPEAT + "\n"] * noises
    for offset, slot in enumerate(sorted(rng.sample(range(noises + 1), len(chain)))):
        lines.insert(slot + offset, chain[offset])
    context = " ".join(lines).replace(". \n", ".\n")
    return context, names, value


def vt(task: str, rng: random.Random, size: int):
    # One worked example first, as RULER's default few-shot setting does.
    ex_context, ex_names, ex_value = vt_example(rng, 5)
    context, names, value = vt_example(rng, size)
    example = (
        VT_TEMPLATE.format(context=ex_context, query=ex_value)
        + VT_PREFIX.format(num_v=5, query=ex_value)
        + " ".join(ex_names)
        + "\n\n"
    )
    return example + VT_TEMPLATE.format(context=context, query=value), VT_PREFIX.format(num_v=5, query=value), names, []


def cwe_list(rng: random.Random, words: list[str], count: int, common: int, rare: int) -> tuple[str, list[str]]:
    chosen = rng.sample(words, count)
    frequent, uncommon = chosen[:10], chosen[10:]
    items = frequent * common + uncommon * rare
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), frequent


def cwe(task: str, rng: random.Random, size: int, long: bool = True):
    words = list(plain_words())
    rng.shuffle(words)
    if long:
        ex_context, ex_answer = cwe_list(rng, words, 40, 10, 3)
        context, answer = cwe_list(rng, words, size, 30, 3)
    else:
        ex_context, ex_answer = cwe_list(rng, words, 20, 3, 1)
        context, answer = cwe_list(rng, words, size, 6, 1)
    example = CWE_TEMPLATE.format(context=ex_context) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    return example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer, []


@cache
def zeta(alpha: float, terms: int = 100_000) -> float:
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def fwe(task: str, rng: random.Random, size: int, vocab_size: int = 80, alpha: float = 2.0):
    vocab: list[str] = []
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    z = zeta(alpha)
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(size * k**-alpha / z))]
    rng.shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4], []


@cache
def qa_pool(dataset: str) -> tuple[list[dict], list[str]]:
    """(questions, documents): SQuAD answerable questions with their article's other paragraphs as first
    distractors, or HotpotQA questions with their supporting paragraphs."""
    if dataset == "squad":
        raw = data.json_file("squad.json")
        docs = sorted({p["context"] for d in raw["data"] for p in d["paragraphs"]})
        ids = {c: i for i, c in enumerate(docs)}
        qas = []
        for article in raw["data"]:
            article_docs = [ids[p["context"]] for p in article["paragraphs"]]
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        own = ids[p["context"]]
                        qas.append(
                            {
                                "query": qa["question"],
                                "outputs": [a["text"] for a in qa["answers"]],
                                "docs": [own],
                                "related": [i for i in article_docs if i != own],
                            }
                        )
        return qas, docs
    raw = data.json_file("hotpotqa.json")
    docs = sorted({f"{t}\n{''.join(p)}" for d in raw for t, p in d["context"]})
    ids = {c: i for i, c in enumerate(docs)}
    qas = [
        {
            "query": d["question"],
            "outputs": [d["answer"]],
            "docs": [ids[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
            "related": [],
        }
        for d in raw
    ]
    return qas, docs


def qa(task: str, rng: random.Random, size: int, extra: tuple[int, ...] = ()):
    qas, docs = qa_pool("squad" if task == "qa_1" else "hotpotqa")
    item = qas[rng.randrange(len(qas))]
    chosen = list(item["docs"])
    related = list(item["related"])
    rng.shuffle(related)
    chosen += related[: max(0, size - len(chosen))]
    while len(chosen) < size:
        candidate = rng.randrange(len(docs))
        if candidate not in chosen:
            chosen.append(candidate)
    chosen += [d for d in extra if d not in chosen]  # top-up distractors chosen by `generate`
    rng.shuffle(chosen)
    context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen))
    return QA_TEMPLATE.format(context=context, query=item["query"]), QA_PREFIX, item["outputs"], []


GENERATORS = {"niah": niah, "vt": vt, "cwe": cwe, "fwe": fwe, "qa": qa}


# ---- sizing and rendering -------------------------------------------------------------------------


def render(tokenizer, text: str, answer_prefix: str, chat: bool) -> str:
    """The prompt as the model sees it: chat template (if any and asked for), then the answer prefix."""
    if chat and has_template(tokenizer):
        return render_chat(tokenizer, text, answer_prefix)
    return text + answer_prefix


def count_tokens(tokenizer, prompt: str, chat: bool) -> int:
    special = not (chat and has_template(tokenizer))
    return len(tokenizer(prompt, add_special_tokens=special)["input_ids"])


def generate(task: str, tokenizer, length: int, seed: int = 42, index: int = 0, chat: bool = True) -> Sample:
    """One RULER sample of about `length` tokens (prompt + generation), deterministic in its arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: choose from {TASKS}")
    kind = family(task)
    new_tokens = TOKENS_TO_GENERATE[kind]
    if length <= new_tokens + 64:
        raise ValueError(f"length={length} is too short for {task} (it generates {new_tokens} tokens)")
    extra = {}
    if kind == "cwe":
        extra["long"] = length >= 4096
    if kind == "fwe":
        extra["vocab_size"] = max(20, length // 50)
    make = GENERATORS[kind]

    attempt = 0

    def build(size: int):
        # The same seed for every size: only the haystack grows, the rest of the sample stays.
        return make(task, rng_for(task, length, seed, index, attempt), size, **extra)

    def total(size: int) -> int:
        text, prefix, _, _ = build(size)
        return count_tokens(tokenizer, render(tokenizer, text, prefix, chat), chat) + new_tokens

    low, high = _size_bounds(kind, task)
    # A QA question whose own documents are longer than the target is replaced by another one.
    while kind == "qa" and total(low) > length and attempt < 20:
        attempt += 1
    size = largest_fitting(total, low, high, length, task)
    if kind == "qa":
        # Whole documents are coarse steps: top up with distractors that still fit, to land near the target.
        docs = qa_pool("squad" if task == "qa_1" else "hotpotqa")[1]
        picker = rng_for(task, length, seed, index, "top-up")
        for _ in range(64):
            if total(size) >= 0.985 * length:
                break
            kept = extra.get("extra", ())
            extra["extra"] = (*kept, picker.randrange(len(docs)))
            if total(size) > length:
                extra["extra"] = kept
    text, prefix, outputs, needles = build(size)
    metric = "string_match_part" if kind == "qa" else "string_match_all"
    return Sample(task, index, text, prefix, outputs, new_tokens, metric, total(size), needles)


# A size whose total is this far over the target is "too big", and so is every larger one: tokenization
# wobbles by a token or two where the haystack grows by a unit, never by a quarter of the prompt.
FAR_OVER = 1.25


def largest_fitting(total, low: int, high: int, target: int, what: str) -> int:
    """The largest size in [low, high) whose total(size) <= target, by bisection (total grows with size).

    Bisection's first probes are huge (half an essay of 100K words, 200K filler words): tokenizing them took
    most of a sample's time. Doubling from `low` first finds a size far over the target; every probe at or
    above it is answered without tokenizing. The probes below it, and so the size found, are bisection's own:
    samples are the same as without the shortcut."""
    if total(low) > target:
        raise ValueError(f"length={target} is too short for {what}")
    too_big = high
    probe = low
    while 2 * probe < high:
        probe *= 2
        if total(probe) > FAR_OVER * target:
            too_big = probe
            break
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if mid < too_big and total(mid) <= target else (low, mid)
    return low


def _size_bounds(kind: str, task: str) -> tuple[int, int]:
    if kind == "niah":
        return (1, len(data.essay_words())) if NIAH[task][0] == "essay" else (1, 20_000)
    if kind == "vt":
        return 5, 20_000  # room for the 5 statements of a chain
    if kind == "cwe":
        return 11, len(plain_words())
    if kind == "fwe":
        return 10, 400_000
    return 1, 2_000


def score(sample: Sample, prediction: str) -> float:
    """RULER's per-sample score in [0, 1]: string_match_all, or string_match_part for QA."""
    return metrics.best_score(sample.metric, prediction, sample.outputs)


__all__ = ["TASKS", "Sample", "generate", "render", "score"]
