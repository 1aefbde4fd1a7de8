"""qwen2.5-0.5b from its PyPI packages: exactness against transformers, passkey retrieval, the CLI.

Marked slow (about ten minutes on 2 cores of an AVX2-only EPYC, plus a one-time conversion). When the model packages are
missing these tests skip, unless FASTKV_REQUIRE_MODELS=1 (set by CI), where they fail instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from fastkv import LLM, FastKV, FullKV, PrefillOptions, SnapKV, passkey_prompt, prefill
from fastkv.cli import app
from fastkv.models import MODELS, part_paths

pytestmark = pytest.mark.slow

if part_paths(MODELS["qwen2.5-0.5b"]) is None:
    if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
        raise RuntimeError(f"qwen2.5-0.5b is not installed: {MODELS['qwen2.5-0.5b'].pip_command}")
    pytest.skip("qwen2.5-0.5b is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM.load("qwen2.5-0.5b", dtype="float32", progress=False)  # the reference precision


def test_fullkv_matches_transformers_on_the_real_model(llm):
    ids = llm.tokenizer("def quicksort(xs):\n    " * 40, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = llm.model(ids, logits_to_keep=1).logits[:, -1]
    _, logits, _ = prefill(llm.adapter, ids, FullKV())
    assert ((logits - ref).abs().max() / ref.abs().max()) < 1e-4


def test_passkey_at_1k_tokens(llm):
    """FullKV, SnapKV and FastKV through `generate_many` (one shared prefill, as each alone would give)."""
    needle = passkey_prompt(llm.tokenizer, 1024, depth=0.4, seed=3)
    methods = [FullKV(), SnapKV(retain_rate=0.1), FastKV(tsp_rate=0.2, retain_rate=0.1)]
    for method, result in zip(methods, llm.generate_many(needle.text, methods, max_tokens=10, chat=True), strict=True):
        s = result.stats
        assert 900 < s.prompt_tokens <= 1024
        assert needle.is_correct(result.text), (method, result.text)
        # rates of a 1K prompt fall under the floors: 10% -> min_budget 256, 20% -> min_tsp_len 512
        if method.name != "fullkv":
            assert s.kv_entries_per_layer == [max(256, s.prompt_tokens // 10)] * 24
        if method.name == "fastkv":
            assert s.tokens_per_layer == [s.prompt_tokens] * 12 + [max(512, s.prompt_tokens // 5)] * 12
            assert s.method.startswith("fastkv(") and "tsp_layer=11" in s.method


def test_prompt_longer_than_the_context_is_refused(llm):
    with pytest.raises(ValueError, match="exceeds the model's context of 32768"):
        llm.generate([1000] * 32760, FullKV(), max_tokens=16)


def test_cli_models_and_bad_input():
    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0 and "qwen2.5-0.5b" in listed.output and "pip install" in listed.output
    bad = runner.invoke(app, ["generate", "--method", "nosuch", "-q", "hi"])
    assert bad.exit_code == 2 and "unknown method 'nosuch'" in bad.output
    bad = runner.invoke(app, ["generate", "--method", "snapkv", "--tsp-rate", "0.3", "-q", "hi"])
    assert bad.exit_code == 2 and "no knob" in bad.output
    bad = runner.invoke(app, ["generate", "--tsp-rate", "3", "-q", "hi"])
    assert bad.exit_code == 2 and "tsp_rate" in bad.output
    bad = runner.invoke(app, ["generate", "--model", "nosuch", "-q", "hi"])
    assert bad.exit_code == 2 and "unknown model 'nosuch'" in bad.output


def test_cli_generate_and_demo():
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--method", "fullkv", "-q", "Reply with the word yes.", "-n", "4"])
    assert result.exit_code == 0, result.output
    assert "prompt tokens" in result.output
    demo = runner.invoke(app, ["demo", "--tokens", "1024", "-n", "8"])
    assert demo.exit_code == 0, demo.output
    for name in ("fullkv", "snapkv", "fastkv"):
        assert name in demo.output
    assert demo.output.count("yes") >= 3  # every method found the needle at 1K tokens


def test_cli_default_method_leaves_a_short_chat_prompt_exact(tmp_path):
    """About 150 tokens under the default FastKV: exactly FullKV's greedy answer (nothing is compressed)."""
    runner = CliRunner()
    text = tmp_path / "short.txt"
    text.write_text(
        "Our team meets on Tuesdays at 10:30 in room 4B. Bring the quarterly numbers: revenue was 4,215,903 "
        "dollars, costs were 3,108,777 dollars, and the new office in Lyon opens on 17 March. The build "
        "server is called falcon-7 and its backup is heron-12. Ask Priya about the migration plan and ask "
        "Tomasz about the budget for the summer interns."
    )
    args = ["generate", "-f", str(text), "-q", "What is revenue minus costs, and where is the new office?", "-n", "40"]
    default = runner.invoke(app, args)
    full = runner.invoke(app, [*args, "--method", "fullkv"])
    assert default.exit_code == 0 and full.exit_code == 0, (default.output, full.output)
    tokens = int(default.stderr.split(" prompt tokens")[0].split()[-1])
    assert 120 <= tokens <= 256, default.stderr
    assert "fastkv(" in default.stderr and "fullkv" in full.stderr
    assert default.stdout.strip() and default.stdout == full.stdout


def test_default_method_uses_the_shipped_profile_on_a_7_digit_passkey():
    """No method knobs: FastKV with qwen2.5-0.5b's calibrated defaults returns the exact 7-digit key in the
    default precision (`fastkv generate`'s: measured fastest here, bfloat16 or float32 with int8 weights).
    In float32 the server test below asks the same."""
    llm = LLM.load("qwen2.5-0.5b", progress=False)
    assert llm.profile is not None and llm.profile.path.endswith("profiles/qwen2.5-0.5b.json")
    needle = passkey_prompt(llm.tokenizer, 2048, depth=0.5, seed=11, digits=7)
    result = llm.generate(needle.text, max_tokens=12, chat=True)
    assert len(needle.answer) == 7 and result.text.strip() == needle.answer, result.text
    assert result.stats.defaults.startswith("profile qwen2.5-0.5b")
    for knob, value in llm.profile.knobs.items():
        assert f"{knob}={value!r}" in result.method
    # 2K tokens is past both floors (min_tsp_len 512, min_budget 256): the profile did compress
    assert result.stats.tokens_per_layer[-1] < result.stats.prompt_tokens // 2


def needle_positions(tokenizer, prompt: str, answer: str) -> set[int]:
    """Token positions of the first occurrence of the passkey in the prompt."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    start = prompt.index(answer)
    end = start + len(answer)
    return {i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start}


def kept_share(cache, trace, key: set[int]) -> float:
    """Share of layers whose cache holds every needle token (in some head); GemFilter: 1 if its second
    pass got them."""
    if getattr(trace, "filter", None):
        return float(key <= set(next(iter(trace.filter.propagated.values())).flatten().tolist()))
    return sum(key <= set(p.flatten().tolist()) for p in cache.positions) / len(cache.positions)


def test_every_method_on_a_2k_passkey(llm):
    from fastkv import PRESETS, decode_step
    from fastkv.methods import parse
    from fastkv.shared import prefill_many

    needle = passkey_prompt(llm.tokenizer, 2048, depth=0.4, seed=3)
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": needle.text}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    key = needle_positions(llm.tokenizer, prompt, needle.answer)
    shares, correct = {}, set()
    methods = [parse(name, defaults={"retain_rate": 0.1}) for name in PRESETS]
    # One shared prefill (exactly each method's own, tests/test_shared.py): the full-prefill methods compute
    # their 24 layers once, FastKV shares its first 12.
    prefilled = prefill_many(llm.adapter, ids, methods, PrefillOptions(max_tokens=8))
    for name, (cache, logits, trace) in zip(PRESETS, prefilled, strict=True):
        tokens = []
        for step in range(8):
            tokens.append(int(logits.argmax()))
            logits = decode_step(llm.adapter, cache, torch.tensor(tokens[-1:]), cache.position_base + step)
        answer = llm.tokenizer.decode(tokens, skip_special_tokens=True)
        shares[name] = kept_share(cache, trace, key)
        if needle.is_correct(answer):
            correct.add(name)
        if name == "streamingllm":
            # sinks plus the most recent tokens, in every layer and head
            budget = max(256, ids.shape[1] // 10)
            expected = list(range(4)) + list(range(ids.shape[1] - (budget - 4), ids.shape[1]))
            assert all(head.tolist() == expected for p in cache.positions for head in p[0])
            assert shares[name] == 0  # the needle, at 40% depth, is gone
    # The query-aware selectors keep the needle in most layers and answer it. H2O (whose scores favour
    # early tokens) and PyramidInfer (which drops context from the residual stream) were seen to miss
    # it on this prompt; they are held to their invariants in test_matrix.py, not to an answer here.
    selectors = {"fullkv", "snapkv", "fastkv", "pyramidkv", "adakv", "gemfilter"}
    assert selectors <= correct, (shares, correct)
    assert all(shares[name] >= 0.5 for name in selectors - {"pyramidkv"}), shares
    assert "streamingllm" not in correct


def test_each_dtype_is_converted_straight_from_the_gguf_and_cached_alone(tmp_path, monkeypatch):
    from fastkv.models import cached_dtypes, converted_dir, default_dtype, load, prepare, status

    spec = MODELS["smollm2-135m"]
    if part_paths(spec) is None:
        pytest.skip("smollm2-135m is not installed")
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))  # a new machine's cache: nothing converted yet
    assert status(spec) == "installed"
    half, _ = load("smollm2-135m", dtype="bfloat16", progress=False)
    # Only the bfloat16 weights (and no float32 copy) were written; config and tokenizer came along, and
    # with the dtype given nothing was measured, so no config-only folder either.
    assert cached_dtypes(spec) == ["bfloat16"] and not converted_dir(spec).exists()
    folders = [p.name for p in tmp_path.iterdir() if p.is_dir()]  # beside it: the conversion's lock file
    assert folders == [converted_dir(spec, torch.bfloat16).name]
    assert status(spec) == "ready (cached: bfloat16)"
    full, _ = load("smollm2-135m", dtype="float32", progress=False)
    assert cached_dtypes(spec) == ["float32", "bfloat16"] and prepare(spec) == converted_dir(spec)

    def weight_bytes(folder) -> int:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    assert weight_bytes(converted_dir(spec, torch.bfloat16)) < 0.55 * weight_bytes(converted_dir(spec))
    # Converting to bfloat16 from the GGUF is rounding the float32 dequantization, weight for weight.
    for (name, a), (_, b) in zip(half.state_dict().items(), full.state_dict().items(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), name
    auto, _ = load("smollm2-135m", progress=False)
    assert auto.dtype == default_dtype("cpu")


def test_server_streams_a_passkey_answer_with_the_default_method(llm):
    """The openai client streams a chat completion from `fastkv serve` (its default method: FastKV with the
    model's profile) and gets the exact 7-digit key, in float32."""
    openai = pytest.importorskip("openai")
    from .test_serve import Live

    needle = passkey_prompt(llm.tokenizer, 2048, depth=0.5, seed=12, digits=7)
    server = Live(llm, name="qwen2.5-0.5b", method="fastkv", kv_mib=512)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        pieces, stats = [], None
        for chunk in client.chat.completions.create(
            model="qwen2.5-0.5b",
            messages=[{"role": "user", "content": needle.text}],
            max_tokens=12,
            temperature=0,
            stream=True,
        ):
            pieces.append(chunk.choices[0].delta.content or "")
            stats = (chunk.model_extra or {}).get("fastkv") or stats
        assert "".join(pieces).strip() == needle.answer
        assert stats["defaults"].startswith("profile qwen2.5-0.5b") and stats["method"].startswith("fastkv(")
        for knob, value in llm.profile.knobs.items():
            assert f"{knob}={value!r}" in stats["method"]
    finally:
        server.close()
