"""Int8 weight-only linears against bfloat16 at qwen2.5-0.5b's shapes, side by side in one run: the evidence
behind `fastkv.quantize` (which kernel for how many rows, and why not float32 or torchao).

    python benchmarks/int8_matmul.py
    python benchmarks/int8_matmul.py --rows 1,8,16,32,48,64,512

For each linear shape and number of rows (1: a decode step; 8: a batch of 8; hundreds: a prefill chunk) it
times a bfloat16 matmul, torch's int8 kernel (`aten._weight_int8pack_mm`, per-row scales), dequantizing
the int8 weight then a bfloat16 matmul, and `fastkv.quantize.Int8Linear` (which picks one of the two);
for one row also float32 (matmul, and the int8 kernel with float32 activations), the int8 linear under
torch.compile with its weights frozen (inductor's C++ GEMM template: what compiled decoding uses) and,
when torchao is installed, torchao's `Int8WeightOnlyConfig` in eager mode. Random weights: this times kernels only;
accuracy on the model is measured by `benchmarks/dtype_fidelity.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastkv.decode import frozen_compilation
from fastkv.precision import header
from fastkv.quantize import Int8Linear

SHAPES = {
    "MLP up/gate (4864x896)": (4864, 896),
    "MLP down (896x4864)": (896, 4864),
    "output layer (151936x896)": (151936, 896),
}


def ms(fn, budget_s: float = 0.5) -> float:
    """Median ms of fn over repeats filling about budget_s."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    times = []
    for _ in range(max(3, min(50, int(budget_s / max(once, 1e-6))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def torchao_linear(linear: nn.Linear):
    """torchao's int8 weight-only version of a bfloat16 linear, or None without torchao."""
    if importlib.util.find_spec("torchao") is None:
        return None
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    wrapped = nn.Sequential(linear)
    quantize_(wrapped, Int8WeightOnlyConfig())
    return wrapped


def times(linear: nn.Linear, q: Int8Linear, x: torch.Tensor) -> tuple[float, float, float, float]:
    """ms of x through: the bfloat16 weight, the int8 kernel, dequantize + bfloat16, Int8Linear."""
    return (
        ms(lambda: F.linear(x, linear.weight)),
        ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q.weight, q.scales)),
        ms(lambda: F.linear(x, q.weight.to(x.dtype) * q.scales[:, None])),
        ms(lambda: q(x)),
    )


def int4_kernel(weight: torch.Tensor, group: int = 32):
    """torch's CPU int4 weight-only kernel on `weight` [n, k] (asymmetric 4-bit codes per group of `group`
    inputs, bfloat16 scales and zeros): a function of bfloat16 rows, or None where torch lacks it."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    except (AttributeError, RuntimeError):
        return None
    # the kernel's convention: w = (code - 8) * scale + zero
    both = torch.stack([scale.squeeze(-1), (low + 8 * scale).squeeze(-1)], -1).transpose(0, 1).contiguous()
    both = both.bfloat16()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, both)


def one_row_alternatives(linear: nn.Linear, q: Int8Linear, x: torch.Tensor) -> str:
    """Cells for one float32 row x: float32 matmul, the int8 kernel fed float32, the int8 kernel with the row
    cast to bfloat16 and back (what `Int8Linear` does for float32 models), int4, torchao (bfloat16)."""
    w32, s32, xb = linear.weight.float(), q.scales.float(), x.bfloat16()
    f32 = ms(lambda: F.linear(x, w32))
    f32_kernel = ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q.weight, s32))
    cast = ms(lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q.weight, q.scales).float())
    int4 = int4_kernel(linear.weight)
    int4_ms = f"{ms(lambda: int4(xb)):.3f}" if int4 is not None else "(not in this torch)"
    ao = torchao_linear(linear)
    ao_ms = f"{ms(lambda: ao(xb)):.3f}" if ao is not None else "(torchao not installed)"
    frozen = frozen_linear(q)
    return f"{f32:.3f} | {f32_kernel:.3f} | {cast:.3f} | {ms(lambda: frozen(xb)):.3f} | {int4_ms} | {ao_ms}"


def frozen_linear(q: Int8Linear):
    """q under torch.compile with its weights frozen and max-autotune (what `fastkv --compile` does for int8
    weights on a CPU: `fastkv.decode.FROZEN`), compiled here on a first call (seconds per shape). Alone, each
    call also pays a compiled graph's entry (guards, wrapper), which a decode step pays once for all."""
    compiled = torch.compile(q)

    def run(x: torch.Tensor) -> torch.Tensor:
        with frozen_compilation():
            return compiled(x)

    return run


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64,512", help="activation rows (tokens) per matmul")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(header("bfloat16 activations unless named"))
    print(
        "| linear | rows | bfloat16 ms | int8 kernel ms | dequantize + bfloat16 ms | Int8Linear ms "
        "| Int8Linear speedup |"
    )
    print("|---|---|---|---|---|---|---|")
    extra = []
    for name, (n, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(k, n, bias=False).bfloat16()
        linear.weight.copy_(torch.randn(n, k, generator=g))
        q = Int8Linear(linear)
        for m in rows:
            dense, kernel, dequant, ours = times(linear, q, torch.randn(m, k, generator=g).bfloat16())
            print(f"| {name} | {m} | {dense:.3f} | {kernel:.3f} | {dequant:.3f} | {ours:.3f} | {dense / ours:.2f}x |")
        extra.append(f"| {name} | {one_row_alternatives(linear, q, torch.randn(1, k, generator=g))} |")
    print()
    print("One row:")
    print("| linear | float32 ms | int8 kernel, float32 rows ms | int8 kernel, rows cast to bfloat16 ms "
          "| int8, compiled frozen (fastkv --compile), bfloat16 ms "
          "| int4 kernel (group 32), bfloat16 ms | torchao int8 weight-only (eager) ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(extra))


if __name__ == "__main__":
    main()
