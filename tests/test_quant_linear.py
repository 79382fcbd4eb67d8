"""QuantLinear and HalfLinear: the kernels and the fallback equal F.linear with the dequantized weight.

With int8 activations (QuantLinear's default) the kernels compute W x_hat, x_hat being the input rounded
to int8 per block of 32 columns; the reference rounds x the same way, written here in torch.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from torch import nn

import qwenkit
from qwenkit.errors import QwenkitError
from qwenkit.generation import score_prompts
from qwenkit.quant import linear as quant_linear
from qwenkit.quant.linear import (
    HEAD_KINDS,
    HalfLinear,
    QuantLinear,
    convert_head,
    fuse_linears,
    pack_int4,
    unpack_int4,
    use_half_weights,
)
from qwenkit.quant.quantize import rtn
from qwenkit.quant.weights import QuantizedWeight

OUT, IN = 96, 256

needs_kernels = pytest.mark.skipif(not quant_linear.native_kernels(), reason="no AVX2 CPU kernels here")


def random_weight(bits, group_size, sym=True, act_order=False, out=OUT, inp=IN, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-inp // group_size)
    q = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    scales = torch.rand((out, groups), generator=g) * 0.02 + 0.001
    if sym:
        zeros = torch.full((out, groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(1, 2**bits, (out, groups), generator=g).float()
    g_idx = None
    if act_order:  # GPTQ's desc_act: group of column i = position of i in a permuted order // group_size
        order = torch.randperm(inp, generator=g)
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[order] = (torch.arange(inp) // group_size).int()
    return QuantizedWeight(q, scales, zeros, bits, group_size, g_idx)


def reference(x, weight, bias=None):
    """fp64 F.linear with the dequantized weight: independent of every kernel."""
    y = F.linear(x.double(), weight.dequantize().double(), None if bias is None else bias.double())
    return y


def round_activations(x):
    """llama.cpp's Q8_0 rounding of each row, per block of 32: d = max|x| / 127, levels round(x / d).

    fp32 arithmetic in the kernel's order (d = amax / 127, levels = round-half-even(x * (1 / d))), so
    the levels are bit-equal to the kernel's. Returns (levels int8, d fp32 [rows, blocks], x_hat fp32).
    """
    blocks = x.float().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    levels = torch.round(blocks * inverse)
    return levels.to(torch.int8).reshape(x.shape), d.squeeze(-1), (levels * d).reshape(x.shape)


def rounded_input(layer, x2):
    """The input a kernel with int8 activations multiplies: x rounded in stored column order."""
    if layer.perm is None:
        return round_activations(x2)[2]
    x_hat = torch.empty_like(x2, dtype=torch.float32)
    x_hat[:, layer.perm] = round_activations(x2[:, layer.perm])[2]
    return x_hat


def expected_input(layer, x):
    """x as the layer's active path sees it: rounded when the kernel runs with int8 activations."""
    x2 = x.reshape(-1, x.shape[-1])
    gathered = x2 if layer.perm is None else x2[:, layer.perm]
    if layer.int8_activations and layer.uses_kernel(gathered):
        return rounded_input(layer, x2.float()).reshape(x.shape)
    return x


def assert_close_to(y, ref, dtype):
    scale = ref.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16 output rounding: 2**-7 of the magnitude
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


CASES = [
    (8, IN, True, False),  # int8 per channel
    (8, 64, False, False),
    (4, 32, True, False),
    (4, 64, False, False),
    (4, 128, True, False),
    (4, 128, False, False),
    (4, 64, False, True),  # act-order
    (8, 128, True, True),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5, 7)])  # kernel (<= GEMV_MAX_ROWS) and chunked paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8_activations", [True, False])
def test_forward_equals_dequantized_linear(bits, group_size, sym, act_order, rows, dtype, int8_activations):
    weight = random_weight(bits, group_size, sym, act_order)
    bias = torch.randn(OUT)
    layer = QuantLinear.from_weight(weight, bias)
    layer.int8_activations = int8_activations
    x = torch.randn(*rows, IN).to(dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (*rows, OUT) and y.dtype == dtype
    assert_close_to(y, reference(expected_input(layer, x), weight, bias), dtype)


@needs_kernels
@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
def test_kernel_and_fallback_both_run_and_agree(bits, group_size, sym, act_order):
    weight = random_weight(bits, group_size, sym, act_order, seed=1)
    layer = QuantLinear.from_weight(weight, torch.randn(OUT))
    x = torch.randn(2, IN)
    gathered = x if layer.perm is None else x[:, layer.perm]
    assert layer.uses_kernel(gathered)
    ref = reference(x, weight, layer.bias)
    layer.int8_activations = False
    assert_close_to(layer._kernel_forward(gathered), ref, torch.float32)
    layer.int8_activations = True
    assert_close_to(
        layer._kernel_forward(gathered), reference(rounded_input(layer, x), weight, layer.bias), torch.float32
    )
    assert_close_to(layer._dequantized_forward(gathered) + layer.bias, ref, torch.float32)


@needs_kernels
def test_activation_rounding_is_llama_cpp_q8_0():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4 * 32, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 0.0]).repeat_interleave(32)
    x[1, 40] = 7.0  # one outlier sets its block's scale
    x[2, :32] = torch.arange(32) - 15.5  # with the 127 below, d = 1: exact halves, rounded half to even
    x[2, 31] = 127.0
    levels, d = torch.ops.qwenkit_cpu.quantize_activations(x)
    want_levels, want_d, _ = round_activations(x)
    assert torch.equal(levels, want_levels) and torch.equal(d, want_d)
    assert levels.abs().max() == 127 and torch.all(levels[:, 96:] == 0) and torch.all(d[:, 3] == 0)


@needs_kernels
@pytest.mark.parametrize("bits,group_size", [(8, IN), (4, 128)])
def test_int8_activation_error_is_within_half_a_level(bits, group_size):
    """|W x_hat - W x| <= sum_i |W[n, i]| * d(i) / 2: each input moves at most half its block's step."""
    weight = random_weight(bits, group_size, sym=False, seed=5)
    layer = QuantLinear.from_weight(weight)
    x = torch.randn(4, IN) * torch.linspace(0.01, 10, IN)  # blocks of very different ranges
    with torch.inference_mode():
        y = layer(x)
    exact = reference(x, weight)
    step = round_activations(x)[1].repeat_interleave(32, dim=1).double()
    bound = (weight.dequantize().double().abs() @ (step / 2).T).T
    fp32_slack = 1e-5 * exact.abs().max()
    assert torch.all((y.double() - exact).abs() <= bound + fp32_slack)
    assert (y.double() - exact).abs().max() > 0  # the rounding is real: this test can fail


@pytest.mark.parametrize(
    "bits,group_size,act_order", [(8, IN, False), (8, 64, True), (4, 32, False), (4, 128, True)]
)
def test_dequantized_rows_are_the_weight_in_stored_order(bits, group_size, act_order):
    weight = random_weight(bits, group_size, sym=False, act_order=act_order, seed=9)
    layer = QuantLinear.from_weight(weight)
    want = weight.dequantize() if layer.perm is None else weight.dequantize()[:, layer.perm]
    rows = slice(5, 41)
    torch.testing.assert_close(layer.dequantize_rows(rows), want[rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.dequantize_rows(slice(None), torch.bfloat16), want.bfloat16())


def test_shapes_the_kernels_refuse_use_the_fallback():
    # 100 input columns: not a multiple of 32 (int4 pads to 128 stored columns); groups of 48
    weight = random_weight(4, 48, sym=False, inp=100, out=40)
    layer = QuantLinear.from_weight(weight)
    x = torch.randn(1, 100)
    assert not layer.kernel_layout and not layer.uses_kernel(x)
    assert_close_to(layer(x), reference(x, weight), torch.float32)


def test_irregular_g_idx_falls_back_and_is_exact():
    # groups of unequal sizes: no contiguous-run layout exists, the fallback gathers per column
    weight = random_weight(8, 64, sym=False)
    weight.g_idx = torch.randint(0, IN // 64, (IN,), generator=torch.Generator().manual_seed(3)).int()
    layer = QuantLinear.from_weight(weight)
    assert not layer.kernel_layout
    x = torch.randn(1, IN)
    assert_close_to(layer(x), reference(x, weight), torch.float32)


def test_fallback_dequantizes_in_chunks(monkeypatch):
    monkeypatch.setattr(quant_linear, "DEQUANT_CHUNK_ELEMENTS", 10 * IN)  # 10 rows at a time
    seen = []
    original = QuantLinear.dequantize_rows

    def spy(self, rows, dtype=torch.float32):
        seen.append(rows)
        return original(self, rows, dtype)

    monkeypatch.setattr(QuantLinear, "dequantize_rows", spy)
    weight = random_weight(4, 64, sym=False)
    x = torch.randn(9, IN)
    assert_close_to(QuantLinear.from_weight(weight)(x), reference(x, weight), torch.float32)
    assert len(seen) == -(-OUT // 10) and all(s.stop - s.start == 10 for s in seen)


def test_int4_packing_is_the_kernels_block_layout():
    q = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 64) and packed.dtype == torch.uint8
    # byte j of a 64-column block: column j in the low nibble, column 32 + j in the high nibble
    assert torch.equal(packed[:, 5] & 15, q[:, 5]) and torch.equal(packed[:, 5] >> 4, q[:, 37])
    assert torch.equal(packed[:, 32 + 7] & 15, q[:, 64 + 7]) and torch.equal(
        packed[:, 32 + 7] >> 4, q[:, 96 + 7]
    )
    assert torch.equal(unpack_int4(packed, 128), q)
    odd = torch.randint(0, 16, (2, 70), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(odd), 70), odd)


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_stay_packed(bits):
    weight = random_weight(bits, 64, sym=False, act_order=True)
    layer = QuantLinear.from_weight(weight, torch.randn(OUT))
    tensors = dict(layer.named_buffers()) | dict(layer.named_parameters())
    big = {n: t for n, t in tensors.items() if t.numel() >= OUT * IN // 4}
    assert set(big) == {"qweight"} and layer.qweight.dtype == torch.uint8
    assert layer.qweight.nbytes == OUT * IN * bits // 8
    total = sum(t.nbytes for t in tensors.values())
    # levels + fp32 scales and scales*zeros per group + int32 groups + int64 perm + fp32 bias
    assert total == OUT * IN * bits // 8 + 2 * OUT * (IN // 64) * 4 + IN * 4 + IN * 8 + OUT * 4
    assert total < OUT * IN * 4 / (3 if bits == 8 else 5)  # vs an fp32 weight (small layer: g_idx weighs)


def test_cast_to_bf16_keeps_fp32_scales_and_levels():
    weight = random_weight(4, 64, sym=False)
    layer = QuantLinear.from_weight(weight, torch.randn(OUT)).to(torch.bfloat16)
    assert layer.scales.dtype == layer.szeros.dtype == torch.float32 and layer.qweight.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(1, IN, dtype=torch.bfloat16)
    assert_close_to(layer(x), reference(x, weight, layer.bias.float()), torch.bfloat16)


def test_gradient_flows_to_the_input_through_the_fallback():
    weight = random_weight(4, 64)
    layer = QuantLinear.from_weight(weight)
    x = torch.randn(1, IN, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.dequantize().sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    weight = random_weight(8, 64)
    with pytest.raises(QwenkitError, match="bias"):
        QuantLinear.from_weight(weight, torch.zeros(OUT + 1))
    with pytest.raises(QwenkitError, match="features"):
        QuantLinear.from_weight(weight)(torch.zeros(1, IN + 1))
    with pytest.raises(QwenkitError, match="dtype"):
        use_half_weights(make_tiny_model(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 9])
def test_half_linear_equals_linear_with_the_rounded_weight(dtype, rows):
    linear = torch.nn.Linear(IN, OUT)
    half = HalfLinear.from_linear(linear, dtype)
    assert half.weight.dtype == dtype and half.weight.nbytes == OUT * IN * 2
    x = torch.randn(rows, IN)
    with torch.inference_mode():
        y = half(x)
    ref = F.linear(x.double(), linear.weight.detach().to(dtype).double(), linear.bias.detach().double())
    assert_close_to(y, ref, torch.float32)
    assert half.to(torch.float32).weight.dtype == dtype  # moving the model keeps 16-bit storage


def test_model_with_half_weights_and_a_quantized_head_decodes_the_same_tokens():
    model = make_tiny_model()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.inference_mode():
        float_logits = model(ids)
    use_half_weights(model, torch.bfloat16)
    assert model.dtype == torch.float32  # activations and the KV cache stay fp32
    with torch.inference_mode():
        half_logits = model(ids)
    torch.testing.assert_close(half_logits, float_logits, rtol=0, atol=0.05 * float_logits.abs().max().item())
    # generation (prefill: chunked path; decode: kernel path) equals the model's own full forward passes
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    seq = ids
    with torch.inference_mode():
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("int8_activations", [True, False])
@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32), (4, 128)])
def test_output_rows_not_a_multiple_of_the_tile(bits, group_size, int8_activations):
    weight = random_weight(bits, group_size, sym=False, out=37, seed=6)  # tiles of 4 rows + 1 left
    layer = QuantLinear.from_weight(weight, torch.randn(37))
    layer.int8_activations = int8_activations
    x = torch.randn(4, IN)
    with torch.inference_mode():
        y = layer(x)
    assert_close_to(y, reference(expected_input(layer, x), weight, layer.bias), torch.float32)
    half = HalfLinear(torch.randn(37, IN).half(), torch.randn(37))
    ref = F.linear(x.double(), half.weight.double(), half.bias.double())
    assert_close_to(half(x), ref, torch.float32)


def quant_layer(bits, group_size, act_order=False, bias=True, seed=0, out=OUT):
    weight = random_weight(bits, group_size, sym=False, act_order=act_order, out=out, seed=seed)
    return QuantLinear.from_weight(weight, torch.randn(out) if bias else None)


@pytest.mark.parametrize("rows", [1, 9])  # kernel and fallback paths
@pytest.mark.parametrize(
    "make",
    [
        lambda: [quant_layer(8, IN, seed=s, out=o) for s, o in ((0, 96), (1, 32), (2, 32))],  # q/k/v
        lambda: [quant_layer(4, 64, bias=False, seed=s) for s in (0, 1)],  # gate/up
        lambda: [quant_layer(4, 32, bias=s == 1, seed=s) for s in (0, 1)],  # one bias of two
        lambda: [HalfLinear.from_linear(torch.nn.Linear(IN, o), torch.bfloat16) for o in (96, 32, 32)],
        lambda: [torch.nn.Linear(IN, o, bias=o == 32) for o in (96, 32)],
    ],
    ids=["int8 qkv", "int4 gate-up", "int4 bias mix", "bf16", "fp32"],
)
def test_fused_layer_equals_the_concatenated_outputs(make, rows):
    modules = make()
    fused = fuse_linears(modules)
    assert type(fused) is type(modules[0])
    assert fused.out_features == sum(m.out_features for m in modules)
    x = torch.randn(rows, IN)
    with torch.inference_mode():
        y = fused(x)
        # the separate layers, each with the same int8 rounding of x (it depends on x alone)
        want = torch.cat([m(x) for m in modules], -1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_act_order_layers_fuse_only_with_equal_permutations():
    same = [quant_layer(4, 64, act_order=True, seed=7) for _ in range(2)]  # same seed: same g_idx
    fused = fuse_linears(same)
    assert fused is not None and torch.equal(fused.perm, same[0].perm)
    x = torch.randn(1, IN)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in same], -1), rtol=1e-5, atol=1e-4)
    different = [quant_layer(4, 64, act_order=True, seed=s) for s in (7, 8)]
    assert not torch.equal(different[0].perm, different[1].perm)
    assert fuse_linears(different) is None


def test_what_cannot_fuse_gives_none():
    assert fuse_linears([]) is None
    assert fuse_linears([quant_layer(8, 64), quant_layer(4, 64)]) is None  # bits
    assert fuse_linears([quant_layer(4, 64), quant_layer(4, 128)]) is None  # group size
    assert fuse_linears([quant_layer(4, 64), HalfLinear(torch.randn(8, IN).half())]) is None  # kinds
    assert (
        fuse_linears([HalfLinear(torch.randn(8, IN).half()), HalfLinear(torch.randn(8, IN).bfloat16())])
        is None
    )
    assert fuse_linears([torch.nn.Linear(IN, 8), torch.nn.Linear(IN + 32, 8)]) is None  # input sizes
    assert fuse_linears([torch.nn.Linear(IN, 8), torch.nn.Linear(IN, 8).double()]) is None  # dtypes
    assert fuse_linears([torch.nn.Conv1d(IN, 8, 1), torch.nn.Conv1d(IN, 8, 1)]) is None  # not a linear


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_converted_head_computes_the_rounded_head(kind):
    model = make_tiny_model(tie_word_embeddings=True)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.inference_mode():
        hidden = model.hidden_states(ids, last_only=True)[:, -1]
        float_logits = model.lm_head(hidden)
    embedding = model.model.embed_tokens.weight.detach().clone()
    convert_head(model, kind)
    assert type(model.lm_head) is (QuantLinear if kind == "int8" else HalfLinear)
    assert torch.equal(model.model.embed_tokens.weight, embedding) and model.dtype == torch.float32
    with torch.inference_mode():
        logits = model(ids, last_only=True)[:, -1]  # one row: the kernel path
    if kind == "int8":  # per-row RTN of the float head, times the input as the layer sees it
        want = reference(expected_input(model.lm_head, hidden), rtn(embedding, 8, -1))
    else:
        want = F.linear(
            hidden.double(), embedding.to(getattr(torch, {"fp16": "float16"}.get(kind, "bfloat16"))).double()
        )
    assert_close_to(logits, want, torch.float32)
    assert_close_to(logits, float_logits.double(), torch.bfloat16)  # and near the float head's


def test_load_with_a_converted_head(tiny_checkpoint, tiny_model):
    model, _ = qwenkit.load(tiny_checkpoint, head="int8")
    assert type(model.lm_head) is QuantLinear and model.lm_head.qweight.dtype == torch.uint8
    prompt = [1, 5, 9, 3, 7]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    scored = score_prompts(model, [prompt])[0]  # prefill path; the vocabulary comes from the config
    want = score_prompts(tiny_model, [prompt])[0]
    for got, ref in zip(scored[1:], want[1:], strict=True):
        assert abs(got.logprob - ref.logprob) < 0.05
    with pytest.raises(QwenkitError, match="head must be one of"):
        qwenkit.load(tiny_checkpoint, head="int4")
    with pytest.raises(QwenkitError, match="already a QuantLinear"):
        convert_head(model, "fp16")


@pytest.mark.parametrize("weights", ["fp16", "bf16"])
def test_load_with_16_bit_weights(tiny_checkpoint, tiny_model, weights):
    """weights="fp16"/"bf16": every block matrix and the head held in 16 bits, activations in fp32; the
    logits are those of the float model with its matrices rounded to 16 bits."""
    storage = {"fp16": torch.float16, "bf16": torch.bfloat16}[weights]
    model, _ = qwenkit.load(tiny_checkpoint, weights=weights)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, HalfLinear))]
    assert linears and all(type(m) is HalfLinear and m.weight.dtype == storage for m in linears)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    rounded = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.to(storage).float())
    prompt = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(model(prompt), rounded(prompt), rtol=1e-4, atol=1e-4)
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 9)  # decode kernels
    with_head, _ = qwenkit.load(tiny_checkpoint, weights=weights, head="int8")
    assert (
        type(with_head.lm_head) is QuantLinear and type(with_head.model.layers[0].mlp.up_proj) is HalfLinear
    )
    with pytest.raises(QwenkitError, match="weights must be one of"):
        qwenkit.load(tiny_checkpoint, weights="int8")
    with pytest.raises(QwenkitError, match="keep fp32 activations: use them with dtype float32"):
        qwenkit.load(tiny_checkpoint, weights=weights, dtype="bfloat16")


@needs_kernels
@pytest.mark.parametrize("kind", ["fp32 rows", "fp32 columns", "fp16", "bf16", "int8", "int4", "int8 fp32 x"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_step_products_equal_the_reference(kind, rows):
    """Each product as the C++ decode step runs it (qwenkit_cpu.decode_linear: its thread team, every
    kind of weight decode_operands / model._float_operands hand it) against fp64 F.linear, with
    output counts that are no multiple of the tile and fp32 inputs of odd length."""
    from qwenkit.model import _float_operands

    out, inp = 203, (96 if kind in ("fp16", "bf16") else 128 if "int" in kind else 77)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(out, generator=g)
    if kind.startswith("fp32"):
        w = torch.randn(out, inp, generator=g)
        layer = torch.nn.Linear(inp, out)
        with torch.no_grad():
            layer.bias.copy_(bias)
            # columns: the transposed storage cpu_decode_layout gives wide matrices, rows 256 apart
            layer.weight.data = torch.empty(inp, 256)[:, :out].copy_(w.t()).t() if "columns" in kind else w
        weight = w.double()
    elif kind in ("fp16", "bf16"):
        layer = HalfLinear(
            torch.randn(out, inp, generator=g).to(
                getattr(torch, "float16" if kind == "fp16" else "bfloat16")
            ),
            bias,
        )
        weight = layer.weight.double()
    else:
        quantized = random_weight(8 if "int8" in kind else 4, 32, sym=False, out=out, inp=inp)
        layer = QuantLinear.from_weight(quantized, bias)
        layer.int8_activations = "fp32 x" not in kind
        weight = quantized.dequantize().double()
    ints, operands = _float_operands(layer)
    assert ints[0] == {"fp32 rows": 0, "fp32 columns": 1, "fp16": 2, "bf16": 2}.get(
        kind, 3 if "int8" in kind else 4
    )
    x = torch.randn(rows, inp, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.qwenkit_cpu.decode_linear(x, operands, ints))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])  # whole rows per thread: the same bits on any team
    x_in = round_activations(x)[2] if "int" in kind and layer.int8_activations else x
    assert_close_to(results[0], F.linear(x_in.double(), weight, bias.double()), torch.float32)
