"""Would int8 weight-only matmuls speed up decoding? One token's qwen2.5-0.5b-shaped linears, bfloat16
against torch's int8 weight-only kernel (`aten._weight_int8pack_mm`, per-row scales), side by side.

    python benchmarks/int8_matmul.py

Random weights: this times the kernels only; accuracy on the model is not measured here.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = {
    "MLP up/gate (4864x896)": (4864, 896),
    "MLP down (896x4864)": (896, 4864),
    "output layer (151936x896)": (151936, 896),
}


def ms(fn, reps: int = 30) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, one bfloat16 token")
    print("| linear | bfloat16 ms | int8 weight-only ms | speedup | max abs difference |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        scale = w.float().abs().amax(1) / 127
        q = (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        s = scale.bfloat16()
        dense, packed = (
            ms(lambda x=x, w=w: F.linear(x, w)),
            ms(lambda x=x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s)),
        )
        diff = (torch.ops.aten._weight_int8pack_mm(x, q, s).float() - F.linear(x, w).float()).abs().max().item()
        print(f"| {name} | {dense:.3f} | {packed:.3f} | {dense / packed:.2f}x | {diff:.2f} |")


if __name__ == "__main__":
    main()
