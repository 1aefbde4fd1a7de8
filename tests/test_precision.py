"""`fastkv.precision`: the machine read from /proc/cpuinfo and torch, `auto`'s choice for mocked CPUs of each
kind, its cache, and the loaded model it leads to."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from fastkv import LLM, FullKV, PrefillOptions, decode_step, precision, prefill
from fastkv.cli import app
from fastkv.precision import Machine, Timings, choose
from fastkv.quantize import Int8Linear

ZEN4 = Machine("AMD EPYC 9R14", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"), "AVX512",
               None, 2, "2.13.0")  # fmt: skip
ZEN3 = Machine("AMD EPYC 7R13", ("avx2", "fma"), "AVX2", None, 2, "2.13.0")
SKYLAKE = Machine("Intel Xeon", ("avx2", "fma", "avx512f", "avx512bw"), "AVX512", None, 2, "2.13.0")
# The AVX2 figures (4864x896, 2 threads): float32 row 0.70 ms, int8 kernel on bfloat16 rows 0.31.
AVX2_TIMES = Timings((4864, 896), row_float32=0.70, row_int8_float32=0.33, prefill_float32=19.0,
                     prefill_int8_float32=21.0)  # fmt: skip
BF16_TIMES = Timings((4864, 896), row_float32=0.60, row_int8_float32=0.20, prefill_float32=19.0,
                     prefill_int8_float32=20.0, row_bfloat16=0.45, row_int8_bfloat16=0.12,
                     prefill_bfloat16=9.0)  # fmt: skip


def test_cpuinfo_and_torch_make_the_machine(monkeypatch):
    info = "processor\t: 0\nmodel name\t: AMD EPYC 7R13 Processor\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
    monkeypatch.setattr(precision, "_cpuinfo", lambda: info)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    where = precision.machine()
    assert where.cpu == "AMD EPYC 7R13 Processor" and where.flags == ("avx2", "fma")
    assert where.aten == torch.backends.cpu.get_cpu_capability() and where.onednn_cap == "AVX2"
    assert not where.native_bf16 and where.kind == "AVX2"


@pytest.mark.parametrize(
    "where, native, kind",
    [
        (ZEN4, True, "AVX512-BF16"),
        (ZEN3, False, "AVX2"),
        (SKYLAKE, False, "AVX-512 without BF16"),
        (Machine("x", ZEN4.flags, "AVX2", None, 2, "t"), False, "AVX2"),  # ATEN_CPU_CAPABILITY=avx2
        (Machine("x", ZEN4.flags, "AVX512", "AVX2", 2, "t"), False, "AVX-512 without BF16"),  # oneDNN capped
        (Machine("x", ("avx2", "amx_bf16", "avx512f"), "AVX512", None, 2, "t"), True, "AMX"),
    ],
)
def test_bfloat16_is_native_only_where_the_cpu_has_it_and_nothing_caps_it(where, native, kind):
    assert where.native_bf16 is native and where.kind == kind


def test_avx2_picks_float32_activations_with_int8_weights():
    choice = choose(ZEN3, AVX2_TIMES)
    assert (choice.dtype, choice.quantize) == ("float32", "int8")
    assert "cast to bfloat16 rows around the int8 kernel" in choice.decode and "float32" in choice.prefill
    assert "emulated" in choice.why


def test_avx512_bf16_picks_bfloat16_with_int8_weights():
    choice = choose(ZEN4, BF16_TIMES)
    assert (choice.dtype, choice.quantize) == ("bfloat16", "int8")
    # The same timings on a machine forced to AVX2 (bfloat16 not native): float32, whatever was measured.
    forced = Machine("x", ZEN4.flags, "AVX2", "AVX2", 2, "t")
    assert (choose(forced, BF16_TIMES).dtype, choose(forced, BF16_TIMES).quantize) == ("float32", "int8")


def test_a_kernel_that_does_not_win_by_the_margin_is_not_taken():
    slow_int8 = Timings((64, 32), row_float32=0.010, row_int8_float32=0.009, prefill_float32=0.1,
                        prefill_int8_float32=0.1)  # fmt: skip
    assert choose(ZEN3, slow_int8).quantize == "none"
    slow_bf16 = Timings((64, 32), 0.6, 0.2, 19.0, 20.0, row_bfloat16=0.5, row_int8_bfloat16=0.1, prefill_bfloat16=18.0)
    choice = choose(ZEN4, slow_bf16)
    assert (choice.dtype, choice.quantize) == ("float32", "int8") and "not faster" in choice.why


def test_measure_times_every_candidate_this_machine_can_run_fast():
    t = precision.measure((96, 64), reps=3)
    plain = (t.row_float32, t.row_int8_float32, t.prefill_float32, t.prefill_int8_float32)
    assert t.shape == (96, 64) and all(v > 0 for v in plain)
    bf16 = (t.row_bfloat16, t.row_int8_bfloat16, t.prefill_bfloat16)
    assert all(v > 0 for v in bf16) if precision.machine().native_bf16 else all(v is None for v in bf16)
    emulated = precision.measure((96, 64), where=ZEN3, reps=3)
    assert emulated.prefill_bfloat16 is None  # never measured where it is emulated


def test_auto_measures_once_per_machine_and_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "machine", lambda: ZEN3)
    calls = []

    monkeypatch.setattr(precision, "measure", lambda shape, where=None: calls.append(shape) or
                        Timings(tuple(shape), 0.70, 0.33, 19.0, 21.0))  # fmt: skip
    first = precision.auto((4864, 896))
    again = precision.auto((4864, 896))
    assert calls == [(4864, 896)] and first == again and (first.dtype, first.quantize) == ("float32", "int8")
    assert first.measured["cache"].startswith(str(tmp_path))
    precision.auto((128, 64))
    precision.auto((4864, 896), remeasure=True)
    assert calls == [(4864, 896), (128, 64), (4864, 896)]
    monkeypatch.setattr(precision, "machine", lambda: ZEN4)  # another machine: its own entry
    precision.auto((4864, 896))
    assert len(calls) == 4


def test_auto_loads_the_choice_and_an_explicit_dtype_keeps_its_weights(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "machine", lambda: ZEN3)
    monkeypatch.setattr(precision, "measure", lambda shape, where=None: Timings(tuple(shape), 0.70, 0.33, 19.0, 21.0))
    llm = LLM.load(str(tiny_dir), progress=False)
    assert llm.precision == "float32+int8" and isinstance(llm.model.lm_head, Int8Linear)
    assert LLM.load(str(tiny_dir), dtype="float32", progress=False).precision == "float32"
    assert LLM.load(str(tiny_dir), quantize="none", progress=False).precision == "float32"  # ZEN3: no bf16


def test_float32_on_int8_weights_stays_near_float32_and_agrees_greedily(tiny_dir):
    """The AVX2 choice against the float32 reference on the tiny model, fed the reference's greedy tokens:
    every step's logits within what int8 weights and bfloat16 decode rows move them (a transposed weight or
    misplaced scales move them by about 100%), and the same greedy token at most steps (random tiny weights
    make near-ties common)."""
    ref = LLM.load(str(tiny_dir), dtype="float32", quantize="none", progress=False)
    q = LLM.load(str(tiny_dir), dtype="float32", quantize="int8", progress=False)
    ids, steps = torch.arange(5, 90)[None], 12
    tokens = ref.generate(ids[0].tolist(), "fullkv", max_tokens=steps, ignore_eos=True).token_ids

    def logits(llm):
        cache, first, _ = prefill(llm.adapter, ids, FullKV(), PrefillOptions(max_tokens=steps))
        rows = [first[0]]
        for t in range(steps - 1):
            rows.append(decode_step(llm.adapter, cache, torch.tensor([tokens[t]]), ids.shape[1] + t)[0])
        return torch.stack(rows).float()

    with torch.inference_mode():
        expected, got = logits(ref), logits(q)
    assert torch.equal(expected.argmax(-1), torch.tensor(tokens))  # the engine's float32 path is the reference
    assert (got - expected).abs().max() <= 0.15 * expected.abs().max()  # random tiny weights: ~10% measured
    agree = got.argmax(-1) == expected.argmax(-1)
    print(f"greedy agreement {int(agree.sum())}/{steps}")
    assert int(agree.sum()) >= 2 * steps // 3  # measured 9/12 here


def test_info_prints_the_machine_and_the_choice(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "measure", lambda shape, where=None: Timings(tuple(shape), 0.70, 0.33, 19.0, 21.0))
    monkeypatch.setattr(precision, "machine", lambda: ZEN3)
    import fastkv.cli.info as info

    monkeypatch.setattr(info, "machine", lambda: ZEN3)
    result = CliRunner().invoke(app, ["info", "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for part in ("AMD EPYC 7R13", "AVX2", "bfloat16 emulated", "dtype float32, quantize int8",
                 "row_int8_float32", "cast to bfloat16 rows"):  # fmt: skip
        assert part in text, part
