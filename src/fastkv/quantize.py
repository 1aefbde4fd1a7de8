"""Int8 weight-only linears: a quarter of float32's bytes (half of bfloat16's) for a decode step to read.

Decoding one token reads every weight once, so on a CPU its time follows the bytes of the weights. Here
each `nn.Linear` of the decoder layers and the output layer keeps its weight as int8 with one scale per
output row (symmetric, `scale = max|row| / 127`, stored in bfloat16). A few rows at a time (a decode step,
a small batch) go through torch's int8 weight-only kernel `aten._weight_int8pack_mm`, which is fast only on
bfloat16 rows: float32 activations are cast to bfloat16 around it and back. More rows (a prefill, a large
batch) dequantize the weight a block at a time to the activations' dtype and take the ordinary matmul,
which is faster there. So a float32 model on int8 weights prefills in float32 and decodes with bfloat16
rows: the combination `fastkv.precision` picks on CPUs without native bfloat16.

Measured (2 threads, `benchmarks/int8_matmul.py`, this model's shapes): on an AVX512-BF16 CPU, for one row
the kernel is 3.2-4.4x faster than a bfloat16 matmul, 0.9-1.7x at 8 rows, 0.5-0.7x at 32; from 64 rows
dequantizing and a bfloat16 matmul beats the kernel. Fed float32 rows directly, the kernel is 1.4-6.6x
slower than float32's own matmul, which is why rows are cast. torchao's int8 weight-only config runs in
eager mode 1.9-7.7x slower than bfloat16 for one row (the same script prints it when torchao is
installed), which is why this is not torchao.

The embedding table stays in the model's dtype (it is gathered, not multiplied); a tied output layer gets
its own int8 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE = ("auto", "none", "int8")
QUANTIZE_HELP = (
    "weights: auto (with --dtype auto: what `fastkv info` measures fastest here; with bfloat16 on "
    "CPU: int8; else none), none, int8 (CPU)"
)
# Up to this many rows go through the int8 kernel; beyond it, dequantize + bfloat16 matmul is faster for
# the decoder's linears (crossover measured between 32 and 64 rows).
KERNEL_ROWS = 32
DEQUANTIZE_BLOCK = 8192  # output features dequantized at a time beyond KERNEL_ROWS


class Int8Linear(nn.Module):
    """A linear layer with weight int8 [out, in] and per-row scales [out] (bfloat16, or float16 for a
    float16 linear: the dtypes the kernel takes).

    forward: x [..., in] -> [..., out], in x's dtype (the linear's own)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
        # Round with the scales as stored, so code x scale is the nearest value in both phases.
        scales = scales.to(torch.float16 if linear.weight.dtype == torch.float16 else torch.bfloat16)
        self.register_buffer("weight", (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= KERNEL_ROWS:
            # The kernel is fast on bfloat16 rows only: float32 rows are cast to it and back (a few rows).
            y = torch.ops.aten._weight_int8pack_mm(rows.to(self.scales.dtype), self.weight, self.scales).to(rows.dtype)
        else:
            y = self.dequantized_matmul(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, in] @ the dequantized weight. A large weight goes a block of output features at a time,
        so its bfloat16 copy stays small (the whole output layer's would be 272 MB written and read again
        per call); a weight of one block goes whole, with no copy of the product."""
        if self.out_features <= DEQUANTIZE_BLOCK:
            return F.linear(rows, self.weight.to(rows.dtype) * self.scales[:, None].to(rows.dtype))
        out = rows.new_empty(rows.shape[0], self.out_features)
        for start in range(0, self.out_features, DEQUANTIZE_BLOCK):
            block = slice(start, start + DEQUANTIZE_BLOCK)
            out[:, block] = F.linear(rows, self.weight[block].to(rows.dtype) * self.scales[block, None].to(rows.dtype))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def resolve_quantize(quantize: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """The mode ("none" or "int8") for a requested one at an explicit dtype (`fastkv.precision` resolves
    "auto" with dtype "auto"); a clear error where int8 cannot run. "auto" quantizes bfloat16 on CPU only:
    asking for float32 asks for float32 weights."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    on_cpu = torch.device(device).type == "cpu"
    if quantize == "auto":
        return "int8" if on_cpu and dtype == torch.bfloat16 else "none"
    if quantize == "int8" and not (on_cpu and dtype in (torch.float32, torch.bfloat16)):
        raise ValueError(
            f"quantize='int8' needs float32 or bfloat16 on CPU (asked: {str(dtype).removeprefix('torch.')} on "
            f"{device}): fastkv's int8 kernel is torch's CPU one"
        )
    return quantize


def quantize_int8(model: nn.Module) -> int:
    """Replace, in place, every nn.Linear of the decoder layers and the output layer with an Int8Linear;
    return how many. The model's own modules stay everything else (norms, rotary, embedding)."""
    count = 0
    for module in [*model.model.layers.modules(), model]:  # the model itself: its lm_head
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
                count += 1
    return count
