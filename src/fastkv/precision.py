"""What this machine computes fastest: its CPU's capabilities, and the precision `auto` picks per phase.

A prefill multiplies thousands of rows by each weight (compute-bound); a decode step multiplies one row
by every weight (bound by the bytes it reads). The best format differs per phase and per CPU:

- with AVX512-BF16 (or AMX), bfloat16 activations are native and int8 weights halve what decode reads;
- with AVX2 only, bfloat16 matmuls are emulated (about 6x slower than float32 for a 4096-row prefill),
  yet torch's int8 weight-only kernel on bfloat16 rows is about 2x faster than a float32 row. There the
  fast combination is float32 activations with int8 weights: a prefill dequantizes a block of weights to
  float32 at a time, a decode step casts its few rows to bfloat16 around the kernel (`fastkv.quantize`).

`choose` decides from the CPU's flags (which candidates can be fast) and `measure`, a one-time
micro-benchmark of the candidate kernels at the model's shapes (under a second), cached per machine and
shape in `$FASTKV_CACHE/precision/`. `fastkv info` prints all of it, and every benchmark prints `header()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# The flags that decide which kernels can be fast here.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which bfloat16 is emulated.
NO_BF16_ISA = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
PREFILL_ROWS = 256  # rows of the prefill matmul measured: enough to be compute-bound
MARGIN = 0.8  # a candidate replaces the plain kernel only when it takes under this share of its time
VERSION = 1  # of the measurement; a change re-measures


@dataclass(frozen=True)
class Machine:
    """The CPU and what torch makes of it: ATen's vector capability and oneDNN's cap (both settable by
    environment variables, which is how an AVX-512 machine is made to behave as an AVX2 one)."""

    cpu: str
    flags: tuple[str, ...]  # those of FLAGS this CPU has
    aten: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    onednn_cap: str | None  # ONEDNN_MAX_CPU_ISA (None: oneDNN uses the best the CPU has)
    threads: int
    torch: str

    @property
    def native_bf16(self) -> bool:
        """Whether bfloat16 matmuls run on bfloat16 hardware: the CPU has AVX512-BF16 or AMX, and neither
        ATen nor oneDNN is capped below it."""
        has = "avx512_bf16" in self.flags or "amx_bf16" in self.flags
        capped = self.aten in ("DEFAULT", "AVX2") or (self.onednn_cap or "").upper() in NO_BF16_ISA
        return has and not capped

    @property
    def kind(self) -> str:
        """In a few words: "AVX512-BF16", "AVX-512 without BF16", "AVX2", "no AVX2" (as torch uses it)."""
        if self.native_bf16:
            return "AMX" if "amx_bf16" in self.flags else "AVX512-BF16"
        if self.aten.startswith("AVX512") and "avx512f" in self.flags:
            return "AVX-512 without BF16"
        return "AVX2" if "avx2" in self.flags else "no AVX2"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def machine() -> Machine:
    info = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())  # fmt: skip
    present = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return Machine(model, tuple(f for f in FLAGS if f in present), torch.backends.cpu.get_cpu_capability(), cap,
                   torch.get_num_threads(), torch.__version__)  # fmt: skip


@dataclass(frozen=True)
class Timings:
    """Milliseconds (median) of one weight's matmul at a model's shapes, per candidate kernel."""

    shape: tuple[int, int]  # the weight [out, in]: the model's largest decoder linear
    row_float32: float  # one row, float32 weights
    row_int8_float32: float  # one float32 row cast to bfloat16 around the int8 kernel, and back
    prefill_float32: float  # PREFILL_ROWS rows, float32 weights
    prefill_int8_float32: float  # PREFILL_ROWS float32 rows on int8 weights dequantized to float32
    row_bfloat16: float | None = None  # the same in bfloat16 (None: not measured, bfloat16 is emulated here)
    row_int8_bfloat16: float | None = None
    prefill_bfloat16: float | None = None


@dataclass(frozen=True)
class Choice:
    """What `auto` resolves to on this machine for one model: one dtype for activations and the KV cache,
    and the weights' format, with what each phase then computes in."""

    dtype: str  # "float32" or "bfloat16"
    quantize: str  # "none" or "int8"
    prefill: str  # in words
    decode: str
    why: str
    timings: Timings | None = None
    measured: dict = field(default_factory=dict)  # where and when the timings were taken


def phases(dtype: str, quantize: str) -> tuple[str, str]:
    """What prefill and decode compute in for a dtype and weight format, in words."""
    if quantize == "none":
        return f"{dtype} weights and activations", f"{dtype} weights and activations"
    prefill = f"{dtype} activations, int8 weights dequantized to {dtype} a block at a time"
    if dtype == "float32":
        return prefill, "float32 activations, cast to bfloat16 rows around the int8 kernel"
    return prefill, f"{dtype} rows through the int8 kernel"


def choose(where: Machine, timings: Timings) -> Choice:
    """The fastest combination for `where` given `timings` (pure: tests feed it mocked machines).

    The dtype follows prefill (compute-bound, where bfloat16 is either 2x faster or 6x slower); int8 weights
    are taken when their kernel beats the dtype's own one-row matmul by `MARGIN` (decode reads every weight
    each step); a bfloat16 dtype is a candidate only where it is native."""
    t = timings
    bf16 = where.native_bf16 and t.prefill_bfloat16 is not None and t.prefill_bfloat16 < MARGIN * t.prefill_float32
    dtype = "bfloat16" if bf16 else "float32"
    plain, int8 = (t.row_bfloat16, t.row_int8_bfloat16) if bf16 else (t.row_float32, t.row_int8_float32)
    quantize = "int8" if int8 is not None and plain is not None and int8 < MARGIN * plain else "none"
    if bf16:
        why = f"native bfloat16: prefill {t.prefill_bfloat16:.2f} ms vs float32 {t.prefill_float32:.2f} ms"
    elif where.native_bf16:
        why = f"bfloat16 prefill not faster here ({t.prefill_bfloat16} ms vs float32 {t.prefill_float32:.2f} ms)"
    else:
        why = f"bfloat16 is emulated on this {where.kind} machine"
    why += f"; a decode row on int8 weights {int8:.3f} ms vs {dtype} weights {plain:.3f} ms"
    prefill, decode = phases(dtype, quantize)
    return Choice(dtype, quantize, prefill, decode, why, timings)


def _median_ms(fn, reps: int) -> float:
    fn()  # warm up (oneDNN primitive creation, packing)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(shape: tuple[int, int], where: Machine | None = None, reps: int = 15) -> Timings:
    """Time the candidate kernels on random weights of `shape` [out, in] (the same kernels `fastkv.quantize`
    and the model's linears call). bfloat16 is measured only where it is native: emulated, it is slow
    enough to dominate the measurement and is never chosen."""
    from .quantize import Int8Linear

    where = where or machine()
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = weight
    row = torch.randn(1, in_features, generator=gen)
    rows = torch.randn(PREFILL_ROWS, in_features, generator=gen)
    with torch.inference_mode():
        q32 = Int8Linear(linear)  # float32 activations: bfloat16 scales, rows cast around the kernel
        found = {
            "row_float32": _median_ms(lambda: F.linear(row, weight), reps),
            "row_int8_float32": _median_ms(lambda: q32(row), reps),
            "prefill_float32": _median_ms(lambda: F.linear(rows, weight), max(3, reps // 4)),
            "prefill_int8_float32": _median_ms(lambda: q32(rows), max(3, reps // 4)),
        }
        if where.native_bf16:
            w16, row16, rows16 = weight.bfloat16(), row.bfloat16(), rows.bfloat16()
            q16 = Int8Linear(linear.bfloat16())
            found |= {
                "row_bfloat16": _median_ms(lambda: F.linear(row16, w16), reps),
                "row_int8_bfloat16": _median_ms(lambda: q16(row16), reps),
                "prefill_bfloat16": _median_ms(lambda: F.linear(rows16, w16), max(3, reps // 4)),
            }
    return Timings(shape=tuple(shape), **found)


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the decoder layers' and the output layer's (the embedding is
    gathered a row at a time), each tensor once."""
    modules = (model.model.layers, model.lm_head)
    tensors = {t.data_ptr(): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def largest_linear(config) -> tuple[int, int]:
    """The weight [out, in] a decode step reads most of per layer: the MLP's up projection."""
    text = getattr(config, "text_config", config)
    return (text.intermediate_size, text.hidden_size)


def cache_path(where: Machine, shape: tuple[int, int]) -> Path:
    from .paths import cache_root

    key = json.dumps([VERSION, asdict(where), list(shape)], sort_keys=True)
    return cache_root() / "precision" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def auto(shape: tuple[int, int], remeasure: bool = False) -> Choice:
    """`choose` for this machine at `shape`, measured once and cached (a cache that cannot be read or
    written is measured again, and said nothing of: it is a cache)."""
    where = machine()
    path = cache_path(where, shape)
    timings = None
    if path.exists() and not remeasure:
        try:
            saved = json.loads(path.read_text())
            timings = Timings(**{**saved["timings"], "shape": tuple(saved["timings"]["shape"])})
            measured = saved["measured"]
        except (OSError, ValueError, KeyError, TypeError):
            timings = None
    if timings is None:
        timings = measure(shape, where)
        measured = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cache": str(path)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"machine": asdict(where), "timings": asdict(timings), "measured": measured}))
        except OSError:
            pass
    choice = choose(where, timings)
    return Choice(**{**asdict(choice), "timings": timings, "measured": measured})


def header(precision: str | None = None) -> str:
    """The line every benchmark prints first: the CPU, its flags, what ATen and oneDNN use, threads, torch;
    and the precision the figures below were computed in."""
    where = machine()
    line = (f"# CPU: {where.cpu} ({where.kind}; flags: {' '.join(where.flags) or 'none read'}); "
            f"ATen {where.aten}, oneDNN {where.onednn_cap or 'uncapped'}; {where.threads} threads; "
            f"torch {where.torch}")  # fmt: skip
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name(0)}"
    return line + (f"\n# precision: {precision}" if precision else "")
