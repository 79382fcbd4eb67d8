"""QuantLinear and HalfLinear: the kernels and the fallback equal F.linear with the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from qwenkit.errors import QwenkitError
from qwenkit.quant import linear as quant_linear
from qwenkit.quant.linear import HalfLinear, QuantLinear, pack_int4, unpack_int4, use_half_weights
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
def test_forward_equals_dequantized_linear(bits, group_size, sym, act_order, rows, dtype):
    weight = random_weight(bits, group_size, sym, act_order)
    bias = torch.randn(OUT)
    layer = QuantLinear.from_weight(weight, bias)
    x = torch.randn(*rows, IN).to(dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (*rows, OUT) and y.dtype == dtype
    assert_close_to(y, reference(x, weight, bias), dtype)


@needs_kernels
@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
def test_kernel_and_fallback_both_run_and_agree(bits, group_size, sym, act_order):
    weight = random_weight(bits, group_size, sym, act_order, seed=1)
    layer = QuantLinear.from_weight(weight)
    x = torch.randn(2, IN)
    gathered = x if layer.perm is None else x[:, layer.perm]
    assert layer.uses_kernel(gathered)
    ref = reference(x, weight)
    assert_close_to(layer._kernel_forward(gathered), ref, torch.float32)
    assert_close_to(layer._dequantized_forward(gathered), ref, torch.float32)


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
