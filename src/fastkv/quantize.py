"""Int8 weight-only linears: half the bytes a decode step reads, for CPUs that decode in bfloat16.

Decoding one token reads every weight once, so on a CPU its time follows the bytes of the weights. Here
each `nn.Linear` of the decoder layers and the output layer keeps its weight as int8 with one scale per
output row (symmetric, `scale = max|row| / 127`); activations stay bfloat16. A few rows at a time (a decode
step, a small batch) go through torch's int8 weight-only kernel `aten._weight_int8pack_mm`; more rows (a
prefill, a large batch) dequantize the weight a block at a time and take the ordinary bfloat16 matmul,
which is faster there.

Measured on this machine (2 threads, `benchmarks/int8_matmul.py`, this model's shapes, one run): for one
row the kernel is 3.2-4.4x faster than a bfloat16 matmul, 0.9-1.7x at 8 rows, 0.5-0.7x at 32; from 64
rows dequantizing and a bfloat16 matmul beats the kernel (0.55-0.86x of bfloat16 weights). With float32
activations the kernel is 1.4-6.6x slower than float32's own matmul, so int8 is offered with bfloat16
activations on CPU only. torchao's int8 weight-only config runs in eager mode 1.9-7.7x slower than
bfloat16 for one row (the same script prints it when torchao is installed), which is why this is not
torchao.

The embedding table stays in the model's dtype (it is gathered, not multiplied); a tied output layer gets
its own int8 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE = ("auto", "none", "int8")
QUANTIZE_HELP = "weights: auto (int8 where activations are bfloat16 on CPU, else none), none, int8"
# Up to this many rows go through the int8 kernel; beyond it, dequantize + bfloat16 matmul is faster for
# the decoder's linears (crossover measured between 32 and 64 rows).
KERNEL_ROWS = 32
DEQUANTIZE_BLOCK = 8192  # output features dequantized at a time beyond KERNEL_ROWS


class Int8Linear(nn.Module):
    """A linear layer with weight int8 [out, in] and per-row scales [out] (in the activation dtype).

    forward: x [..., in] -> [..., out], in x's dtype, which must be the scales' dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
        # Round with the scales as stored (in the activation dtype), so code x scale is the nearest value.
        scales = scales.to(linear.weight.dtype)
        self.register_buffer("weight", (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= KERNEL_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
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
            return F.linear(rows, self.weight.to(rows.dtype) * self.scales[:, None])
        out = rows.new_empty(rows.shape[0], self.out_features)
        for start in range(0, self.out_features, DEQUANTIZE_BLOCK):
            block = slice(start, start + DEQUANTIZE_BLOCK)
            out[:, block] = F.linear(rows, self.weight[block].to(rows.dtype) * self.scales[block, None])
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def resolve_quantize(quantize: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """The mode ("none" or "int8") for a requested one; a clear error where int8 cannot run or would be slower."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    fits = torch.device(device).type == "cpu" and dtype == torch.bfloat16
    if quantize == "auto":
        return "int8" if fits else "none"
    if quantize == "int8" and not fits:
        raise ValueError(
            f"quantize='int8' needs bfloat16 on CPU (asked: {str(dtype).removeprefix('torch.')} on {device}): "
            "with float32 activations its kernel is slower than float32's matmul, and fastkv offers it on CPU only"
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
