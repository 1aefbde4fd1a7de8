"""Int8 weight-only linears (`fastkv.quantize`): exact against a brute-force dequantized matmul, the engine
equal to transformers' own forward on the quantized model, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fastkv import LLM, FullKV, PrefillOptions, adapter_for, decode_step, parse, prefill, quantize
from fastkv.cli import app
from fastkv.quantize import KERNEL_ROWS, Int8Linear, quantize_int8, resolve_quantize

from .conftest import build_tiny, prompt_ids


def brute_force_int8(weight: torch.Tensor) -> torch.Tensor:
    """The weight each row's int8 codes stand for, row by row: scale max|w| / 127 (stored in bfloat16),
    codes rounded and kept within +-127."""
    rows = []
    for row in weight.detach().float():
        scale = float(torch.tensor(float(row.abs().max()) / 127 or 1.0).to(torch.bfloat16))
        rows.append(torch.tensor([max(-127, min(127, round(float(w) / scale))) * scale for w in row]))
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, KERNEL_ROWS + 9])  # the int8 kernel, and the dequantizing path
@pytest.mark.parametrize("block", [8192, 10])  # output features dequantized at once: all, or 10 (a ragged last block)
def test_int8_linear_equals_a_brute_force_dequantized_matmul(bias, rows, block, monkeypatch):
    monkeypatch.setattr(quantize, "DEQUANTIZE_BLOCK", block)
    torch.manual_seed(0)
    linear = nn.Linear(48, 24, bias=bias).bfloat16()
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row stays zero
    q = Int8Linear(linear)
    expected_w = brute_force_int8(linear.weight)
    assert q.weight.dtype == torch.int8 and q.scales.dtype == torch.bfloat16
    assert torch.equal(q.weight[3], torch.zeros(48, dtype=torch.int8))
    # Every weight moves by at most half a step of its row, plus what the bfloat16 scale's rounding adds.
    step = linear.weight.float().abs().amax(1, keepdim=True) / 127
    assert ((expected_w - linear.weight.float()).abs() <= step / 2 + 127 * step * 2**-8).all()
    assert torch.equal(q.weight.float() * q.scales.float()[:, None], expected_w)
    x = torch.randn(2, rows, 48).bfloat16()
    expected = x.float() @ expected_w.T + (linear.bias.float() if bias else 0)
    with torch.inference_mode():
        got = q(x)
    assert got.shape == (2, rows, 24) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("rows", [1, KERNEL_ROWS, KERNEL_ROWS + 9])
def test_float32_rows_on_int8_weights_are_cast_around_the_kernel_and_dequantized_beyond_it(rows):
    """A float32 linear keeps bfloat16 scales (the kernel's dtype). Up to KERNEL_ROWS rows go to the kernel
    as bfloat16 and come back float32: within bfloat16 rounding of the input. More rows take the float32
    matmul on the dequantized weight: float32-accurate against the same brute-force weight."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 40)
    q = Int8Linear(linear)
    assert q.scales.dtype == torch.bfloat16 and q.bias.dtype == torch.float32
    expected_w = brute_force_int8(linear.weight)  # float32 weights, codes rounded against bfloat16 scales
    assert torch.equal(q.weight.float() * q.scales.float()[:, None], expected_w)
    x = torch.randn(1, rows, 64)  # rows rows in all: the kernel up to KERNEL_ROWS
    expected = x.double() @ expected_w.double().T + linear.bias.detach().double()
    with torch.inference_mode():
        got = q(x)
    assert got.shape == (1, rows, 40) and got.dtype == torch.float32
    error = float((got.double() - expected).abs().max() / expected.abs().max())
    if rows <= KERNEL_ROWS:
        assert error <= 2**-6  # the rows' bfloat16 rounding, summed over 64 products
        assert error > 1e-5  # they were rounded: the kernel path, not float32's
    else:
        assert error <= 1e-5


def test_quantize_replaces_every_decoder_linear_and_the_output_layer():
    model = build_tiny("qwen2").bfloat16()
    embedding = model.model.embed_tokens.weight.clone()
    assert quantize_int8(model) == 4 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # gathered, so left alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_engine_on_int8_weights_follows_transformers_forward(family, dtype):
    """transformers' own greedy generation through the same quantized modules is the reference, and we are fed
    its tokens (teacher forcing), so that a near-tie cannot send the two down different paths. At every step
    our logits equal the ones its own cached decoding produced, within bfloat16 rounding (measured: at most
    1.5e-2 of the largest with ATen and oneDNN forced to AVX2, 5e-3 natively), and our greedy choice is its
    own wherever its best token leads the second by more than that rounding could move: a tie, which another
    ISA's rounding may flip, is skipped, and most steps must be clear. Both stay near the unquantized model
    (misplaced scales or a transposed weight would be off by about 100%)."""
    model = build_tiny(family).to(dtype)
    plain = build_tiny(family).to(dtype)
    quantize_int8(model)
    ids, steps = prompt_ids(48, seed=3), 12
    with torch.inference_mode():
        # No EOS: min_new_tokens would mask it out of the scores it chooses from, not out of the raw logits.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        ref = out.sequences
        forward = torch.cat(out.logits).float()  # [steps, V]: the logits each of its tokens was chosen from
        unquantized = plain(ids).logits[:, -1].float()
    adapter = adapter_for(model)
    cache, logits, _ = prefill(adapter, ids, FullKV(), PrefillOptions(max_tokens=steps))
    ours = [logits[0]]
    for t in range(steps - 1):  # fed transformers' tokens, not ours
        ours.append(decode_step(adapter, cache, ref[:, 48 + t], 48 + t)[0])
    ours = torch.stack(ours)
    tolerance = 0.02 * forward.abs().max()  # bfloat16 activations: 2^-8 per op, over 2 layers' sums
    assert (ours - forward).abs().max() <= tolerance
    top2 = forward.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert int(clear.sum()) >= steps // 2, "too few steps with a clear best token to test greedy choices"
    assert torch.equal(ours.argmax(-1)[clear], forward.argmax(-1)[clear])
    assert torch.equal(forward.argmax(-1), ref[0, 48:])  # the reference is transformers' own greedy path
    assert (ours[0] - unquantized[0]).abs().max() <= 0.15 * unquantized.abs().max()


def test_a_batch_on_int8_weights_equals_each_solo_run(tiny_dir):
    llm = LLM.load(str(tiny_dir), dtype="bfloat16", progress=False)  # auto: int8 on CPU in bfloat16
    assert isinstance(llm.model.lm_head, Int8Linear) and llm.precision == "bfloat16+int8"
    method = parse("fastkv", knobs={"tsp_layer": 1, "tsp_rate": 0.5, "retain_rate": 0.5})
    prompts = [list(range(5, 80)), list(range(200, 240)), list(range(300, 420))]
    batch = llm.generate(prompts, method, max_tokens=8, ignore_eos=True)
    solo = [llm.generate(p, method, max_tokens=8, ignore_eos=True) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]


def test_auto_at_an_explicit_dtype_quantizes_only_bfloat16_on_cpu(tiny_dir):
    assert resolve_quantize("auto", "cpu", torch.bfloat16) == "int8"
    assert resolve_quantize("auto", "cpu", torch.float32) == "none"  # float32 asked: float32 weights
    assert resolve_quantize("auto", "cuda", torch.bfloat16) == "none"
    assert resolve_quantize("none", "cpu", torch.bfloat16) == "none"
    assert resolve_quantize("int8", "cpu", torch.float32) == "int8"
    plain = LLM.load(str(tiny_dir), dtype="float32", progress=False)
    assert type(plain.model.lm_head) is nn.Linear and plain.precision == "float32"
    kept = LLM.load(str(tiny_dir), dtype="bfloat16", quantize="none", progress=False)
    assert type(kept.model.lm_head) is nn.Linear
    both = LLM.load(str(tiny_dir), dtype="float32", quantize="int8", progress=False)
    assert isinstance(both.model.lm_head, Int8Linear) and both.precision == "float32+int8"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int8", "--dtype", "float16"], "needs float32 or bfloat16 on CPU (asked: float16"),
        (["--quantize", "int4"], "unknown quantize 'int4'"),
    ],
)
def test_int8_where_it_cannot_run_is_refused(args, message):
    result = CliRunner().invoke(app, ["generate", "--method", "fullkv", *args, "-q", "hello"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
