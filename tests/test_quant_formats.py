"""GPTQ and AWQ checkpoints: the packings round-trip, match the published bit layouts, and load with
the logits of the float model whose weights are the dequantized values."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, randomize_biases
from safetensors.torch import load_file, save_file
from test_checkpoint import write_original_layout

import qwenkit
from qwenkit import QwenkitError
from qwenkit.checkpoint import describe
from qwenkit.cli.checkpoint import info_table
from qwenkit.quant import QuantizedWeight
from qwenkit.quant.formats import (
    QuantConfig,
    pack_awq,
    pack_gptq,
    pack_layer,
    parse_quant_config,
    unpack_awq,
    unpack_gptq,
)
from qwenkit.quant.linear import QuantLinear

IDS = torch.tensor([[1, 7, 200, 13, 99, 255, 3, 42, 42, 0, 128]])
AWQ_ORDER_SPEC = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: field k of a word holds output column 8c + order[k]
LINEARS = {  # the quantized block linears of each layout (embeddings, norms, head stay float)
    "qwen2": re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"),
    "qwen": re.compile(
        r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj)\.weight"
    ),
}


# --- an independent reading of the published layouts (numpy integer arithmetic, from the spec) -------


def words(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64) & 0xFFFFFFFF  # the int32 words as unsigned 32-bit values


def reference_gptq(parts: dict, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """auto-gptq: W[o, i] = scales[g[i], o] * (field(i) of qweight - (field(o) of qzeros + 1))."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros = words(parts["qweight"]), words(parts["qzeros"])
    rows, cols = np.arange(qweight.shape[0] * per_word), np.arange(qweight.shape[1])
    q = (qweight[rows // per_word, :] >> (bits * (rows % per_word))[:, None]) & mask  # [in, out]
    z = ((qzeros[:, cols // per_word] >> (bits * (cols % per_word))[None, :]) + zero_offset) & mask
    g = parts["g_idx"].numpy().astype(np.int64)
    scales = parts["scales"].float().numpy().astype(np.float64)
    return torch.from_numpy(scales[g, :] * (q - z[g, :])).t().float()


def reference_awq(parts: dict, group_size: int) -> torch.Tensor:
    """AutoAWQ GEMM: column o sits in word o // 8 at field order.index(o % 8); zeros stored as they are."""
    qweight, qzeros = words(parts["qweight"]), words(parts["qzeros"])
    cols = np.arange(qweight.shape[1] * 8)
    shift = 4 * np.array([AWQ_ORDER_SPEC.index(c % 8) for c in cols])
    q = (qweight[:, cols // 8] >> shift[None, :]) & 15
    z = (qzeros[:, cols // 8] >> shift[None, :]) & 15
    g = np.arange(qweight.shape[0]) // group_size
    scales = parts["scales"].float().numpy().astype(np.float64)
    return torch.from_numpy(scales[g, :] * (q - z[g, :])).t().float()


def test_reference_layouts_on_hand_made_words():
    """The reference readers agree with words written out by hand from the spec."""
    q_column = torch.arange(1, 9, dtype=torch.int32)  # GPTQ int4: input rows 0..7 = 1..8 -> 0x87654321
    parts = {
        "qweight": torch.tensor([[0x87654321 - (1 << 32)]], dtype=torch.int32),
        "qzeros": torch.tensor([[0]], dtype=torch.int32),  # zero - 1 = 0 in every field: zero 1
        "scales": torch.tensor([[2.0] * 8], dtype=torch.float16),
        "g_idx": torch.zeros(8, dtype=torch.int32),
    }
    parts["qweight"] = parts["qweight"].expand(1, 8).contiguous()
    assert torch.equal(reference_gptq(parts, 4)[0], 2.0 * (q_column - 1).float())
    awq_word = sum(order << (4 * k) for k, order in enumerate(AWQ_ORDER_SPEC))  # columns 0..7 = levels 0..7
    assert awq_word == 0x75316420
    awq = {
        "qweight": torch.tensor([[awq_word]], dtype=torch.int32),
        "qzeros": torch.tensor([[0]], dtype=torch.int32),
        "scales": torch.ones(1, 8, dtype=torch.float16),
    }
    assert torch.equal(reference_awq(awq, 1)[:, 0], torch.arange(8).float())


# --- quantizing in the test: round to nearest per group, as a GPTQ/AWQ checkpoint would hold ----------


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool, seed: int = 0):
    """QuantizedWeight of a float weight; act_order groups a random permutation of the columns."""
    out_features, in_features = weight.shape
    group_size = in_features if group_size == -1 else group_size
    if act_order:
        perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_features) // group_size).int()
    else:
        g_idx = (torch.arange(in_features) // group_size).int()
    n_groups, top = -(-in_features // group_size), (1 << bits) - 1
    scales, zeros = torch.empty(out_features, n_groups), torch.empty(out_features, n_groups)
    for g in range(n_groups):
        cols = weight[:, g_idx == g]
        if sym:
            scales[:, g] = cols.abs().amax(dim=1).clamp_min(1e-8) * 2 / top
            zeros[:, g] = (top + 1) // 2
        else:
            low, high = cols.amin(dim=1).clamp_max(0), cols.amax(dim=1).clamp_min(0)
            scales[:, g] = ((high - low) / top).clamp_min(1e-8)
            zeros[:, g] = (-low / scales[:, g]).round()
    scales = scales.half().float()
    g = g_idx.long()
    q = (weight / scales[:, g] + zeros[:, g]).round().clamp(0, top).to(torch.uint8)
    return QuantizedWeight(q, scales.half(), zeros.half(), bits, group_size, g_idx if act_order else None)


VARIANTS = {  # id: (layout, quant_method, bits, group_size, desc_act, sym)
    "qwen2-gptq4-g32": ("qwen2", "gptq", 4, 32, False, True),
    "qwen2-gptq4-g128-asym": ("qwen2", "gptq", 4, 128, False, False),
    "qwen2-gptq4-actorder": ("qwen2", "gptq", 4, 32, True, True),
    "qwen2-gptq8-perchannel": ("qwen2", "gptq", 8, -1, False, True),
    "qwen2-gptq8-actorder-asym": ("qwen2", "gptq", 8, 32, True, False),
    "qwen-gptq4-g32": ("qwen", "gptq", 4, 32, False, True),
    "qwen-gptq4-actorder-asym": ("qwen", "gptq", 4, 32, True, False),
    "qwen-gptq8-g128": ("qwen", "gptq", 8, 128, False, True),
    "qwen2-awq-g32": ("qwen2", "awq", 4, 32, False, False),
    "qwen2-awq-g128": ("qwen2", "awq", 4, 128, False, False),
}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_pack_unpack_round_trip(bits, group_size, act_order, sym):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    w = rtn(weight, bits, group_size, sym, act_order)
    parts = pack_gptq(w)
    assert parts["qweight"].dtype == parts["qzeros"].dtype == parts["g_idx"].dtype == torch.int32
    assert parts["qweight"].shape == (64 * bits // 32, 48) and parts["scales"].dtype == torch.float16
    back = unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits, group_size)
    assert (
        torch.equal(back.q, w.q) and torch.equal(back.zeros, w.zeros) and torch.equal(back.scales, w.scales)
    )
    assert (back.g_idx is None) == (not act_order or group_size == -1)
    assert torch.equal(back.dequantize(), w.dequantize())
    assert torch.equal(reference_gptq(parts, bits), w.dequantize())
    assert torch.equal(pack_gptq(back)["qweight"], parts["qweight"])
    v2 = pack_gptq(w, zero_offset=0)  # gptq_v2 stores the zero itself
    assert torch.equal(reference_gptq(v2, bits, zero_offset=0), w.dequantize())


@pytest.mark.parametrize("group_size", [16, 128, -1])
def test_awq_pack_unpack_round_trip(group_size):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    w = rtn(weight, 4, group_size, sym=False, act_order=False)
    parts = pack_awq(w)
    assert parts["qweight"].shape == (128, 6) and parts["qzeros"].shape == (w.n_groups, 6)
    back = unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], 4, group_size)
    assert torch.equal(back.q, w.q) and torch.equal(back.zeros, w.zeros)
    assert torch.equal(back.dequantize(), w.dequantize())
    assert torch.equal(reference_awq(parts, w.group_size), w.dequantize())


def test_zero_point_zero_survives_the_minus_one():
    """auto-gptq stores zero - 1: a zero of 0 is stored as all ones in its field and read back as 0."""
    w = rtn(torch.rand(8, 32) + 0.5, 4, 32, sym=False, act_order=False)  # all positive: zero point 0
    assert int(w.zeros.max()) == 0
    parts = pack_gptq(w)
    assert int(words(parts["qzeros"])[0, 0]) == 0xFFFFFFFF
    assert torch.equal(unpack_gptq(**{k: parts[k] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits=4,
                                   group_size=32).zeros, w.zeros)  # fmt: skip


# --- fixture checkpoints in each published format, loaded by qwenkit.load ----------------------------


def quantize_directory(directory, layout, method, bits, group_size, desc_act, sym, config_in):
    """Replace the float block linears of a checkpoint directory by their packed form (one file) and
    describe the quantization in config.json and/or quantize_config.json; returns {linear: parts}."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    config = QuantConfig(method, bits, group_size, desc_act, sym, 1 if method == "gptq" else 0)
    stored, packed = {}, {}
    for i, (name, tensor) in enumerate(tensors.items()):
        if not LINEARS[layout].fullmatch(name):
            stored[name] = tensor
            continue
        parts = pack_layer(config, rtn(tensor.float(), bits, group_size, sym, desc_act, seed=i))
        prefix = name.removesuffix(".weight")
        stored.update({f"{prefix}.{k}": v for k, v in parts.items()})
        packed[prefix] = parts
    save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})
    settings = {"bits": bits, "group_size": group_size}
    if method == "gptq":
        settings |= {"desc_act": desc_act, "sym": sym, "damp_percent": 0.01, "static_groups": False}
    else:
        settings |= {"version": "gemm", "zero_point": True}
    hf = json.loads((directory / "config.json").read_text())
    if config_in in ("config", "both"):
        hf["quantization_config"] = {**settings, "quant_method": method}
        (directory / "config.json").write_text(json.dumps(hf))
    if config_in in ("file", "both"):
        (directory / "quantize_config.json").write_text(json.dumps(settings))
    return packed


def dequantized_directory(quantized, target, packed, layout, method, bits, group_size):
    """A float checkpoint with the reference-dequantized weights in place of the packed ones."""
    target.mkdir()
    for file in quantized.iterdir():
        if file.name not in ("model.safetensors", "quantize_config.json"):
            target.joinpath(file.name).write_bytes(file.read_bytes())
    hf = json.loads((target / "config.json").read_text())
    hf.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(hf))
    tensors = {
        k: v
        for k, v in load_file(quantized / "model.safetensors").items()
        if k.rpartition(".")[0] not in packed or k.endswith(".bias")
    }
    for prefix, parts in packed.items():
        if method == "gptq":
            tensors[f"{prefix}.weight"] = reference_gptq(parts, bits).contiguous()
        else:
            in_features = parts["qweight"].shape[0]
            group = in_features if group_size == -1 else group_size
            tensors[f"{prefix}.weight"] = reference_awq(parts, group).contiguous()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def float_model(layout):
    model = make_tiny_model("tiny" if layout == "qwen" else "tiny-gqa", seed=3, vocab_size=256)
    return randomize_biases(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_published_formats_load_with_the_dequantized_logits(variant, tmp_path, byte_tokenizer):
    layout, method, bits, group_size, desc_act, sym = VARIANTS[variant]
    model = float_model(layout)
    directory = tmp_path / "quantized"
    if layout == "qwen":
        write_original_layout(model, directory, byte_tokenizer.path)
    else:
        qwenkit.save(model, byte_tokenizer, directory)
    config_in = ["config", "file", "both"][list(VARIANTS).index(variant) % 3]  # each source in turn
    packed = quantize_directory(directory, layout, method, bits, group_size, desc_act, sym, config_in)
    dequantized_directory(directory, tmp_path / "float", packed, layout, method, bits, group_size)

    quantized_model, _ = qwenkit.load(directory)
    reference, _ = qwenkit.load(tmp_path / "float")
    with torch.no_grad():
        got, want, original = quantized_model(IDS), reference(IDS), model(IDS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert (got - original).abs().max() < 0.5 * original.abs().max()  # close to the float model too
    assert all(t.device.type == "cpu" for t in [*quantized_model.parameters(), *quantized_model.buffers()])
    layer = quantized_model.model.layers[1]
    linears = [layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.down_proj]
    assert all(isinstance(m, QuantLinear) and m.bits == bits for m in linears)
    assert not any(  # the weight stays packed: no float copy of it
        b.is_floating_point() and b.shape == (m.out_features, m.in_features)
        for m in linears
        for b in m.buffers()
    )
    torch.testing.assert_close(quantized_model.model.embed_tokens.weight, model.model.embed_tokens.weight)

    table = info_table(describe(directory))
    assert re.search(rf"quantization +{method} int{bits}, .*{len(packed)} layers packed in \d+ [MG]iB", table)
    info = describe(directory)["quantization"]
    assert info == {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "act_order": desc_act,
        "sym": sym if method == "gptq" else False,
        "quantized_layers": len(packed),
        "packed_bytes": sum(
            t.numel() * t.element_size() for parts in packed.values() for t in parts.values()
        ),
    }


# --- what is not supported is named -----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits 3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size 0"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": "yes"}, "desc_act 'yes'"),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
            "checkpoint_format",
        ),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True},
            "is_marlin_format",
        ),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "version 'exllama'"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "bits 8"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point False"),
        ({"quant_method": "fp8"}, "quant_method 'fp8'"),
    ],
)
def test_unsupported_settings_are_named(settings, message):
    with pytest.raises(QwenkitError, match=re.escape(message)):
        parse_quant_config(settings)


def test_checkpoint_errors_name_the_field_and_tensor(tmp_path, byte_tokenizer):
    model = float_model("qwen2")
    directory = tmp_path / "q"
    qwenkit.save(model, byte_tokenizer, directory)
    packed = quantize_directory(directory, "qwen2", "gptq", 4, 32, False, True, "both")
    hf = json.loads((directory / "config.json").read_text())

    (directory / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32}))
    with pytest.raises(QwenkitError, match="'bits' disagrees: 4 in config.json, 8 in quantize_config.json"):
        qwenkit.load(directory)
    (directory / "quantize_config.json").unlink()

    (directory / "config.json").write_text(json.dumps(hf | {"quantization_config": {**hf["quantization_config"],
                                                                                  "bits": 2}}))  # fmt: skip
    with pytest.raises(QwenkitError, match="bits 2 is not supported for gptq"):
        qwenkit.load(directory)
    with pytest.raises(QwenkitError, match="bits 2"):
        describe(directory)

    (directory / "config.json").write_text(json.dumps(hf | {"quantization_config": {**hf["quantization_config"],
                                                                                  "group_size": 16}}))  # fmt: skip
    with pytest.raises(
        QwenkitError, match=r"model\.layers\.\d\.\w+\.\w+\.qzeros is int32 \[\d+, \d+\]; expected"
    ):
        qwenkit.load(directory)

    (directory / "config.json").write_text(json.dumps(hf))
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(QwenkitError, match=r"model\.layers\.1\.mlp\.down_proj\.scales"):
        qwenkit.load(directory)
    assert packed


def test_quantized_weight_validates_its_fields():
    q = torch.zeros(4, 8, dtype=torch.uint8)
    ok = torch.ones(4, 2)
    with pytest.raises(QwenkitError, match="bits must be 4 or 8, got 3"):
        QuantizedWeight(q, ok, ok, 3, 4)
    with pytest.raises(QwenkitError, match=r"scales must be a float \[4, 2\]"):
        QuantizedWeight(q, torch.ones(4, 3), ok, 4, 4)
    with pytest.raises(QwenkitError, match="q has levels above 15"):
        QuantizedWeight(q + 16, ok, ok, 4, 4)
    with pytest.raises(QwenkitError, match="g_idx values must lie in 0 .. 1"):
        QuantizedWeight(q, ok, ok, 4, 4, torch.full((8,), 2, dtype=torch.int32))
    w = QuantizedWeight(q + 3, ok * 0.5, ok, 4, 4)
    assert torch.equal(w.dequantize(), torch.ones(4, 8))
    assert w.nbytes_packed() == 4 * 8 // 2 + 8 * 4 + 8 // 2
