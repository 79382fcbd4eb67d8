"""qwenkit.quant.quantize and `qwenkit quantize`: RTN and GPTQ weights, the GPTQ files they are written
to, and what reads them back (qwenkit, transformers through gptqmodel when installed)."""

import json
import math
import shutil

import pytest
import torch
from conftest import make_tiny_model, randomize_biases
from safetensors.torch import load_file

import qwenkit
from qwenkit.cli import main
from qwenkit.errors import QwenkitError
from qwenkit.quant.quantize import (
    calibration_batches,
    check_method,
    gptq,
    gptq_config,
    layer_error,
    quantize_model,
    replace_linears,
    rtn,
    save_quantized,
)

pytestmark = pytest.mark.filterwarnings("ignore:calibrating on qwenkit's built-in")  # checked once below


def correlated_layer(out_features=48, in_features=256, tokens=1024, seed=0):
    """A weight and calibration inputs whose features are correlated (as real activations are), so
    that GPTQ has errors to compensate; one input feature is always 0 (a dead column)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g)
    mixing = torch.randn(in_features, in_features, generator=g) / math.sqrt(in_features)
    X = torch.randn(tokens, in_features, generator=g) @ mixing + 0.3 * torch.randn(
        tokens, in_features, generator=g
    )
    X = X * torch.linspace(0.2, 3.0, in_features)  # features of different sizes: act-order matters
    X[:, 7] = 0
    return W, X, X.t() @ X / tokens


def auto_gptq_grid(w, bits, sym):
    """auto-gptq's Quantizer.find_params for rows with both signs (quantizer.py), rebuilt here."""
    maxq = 2**bits - 1
    low, high = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        high = torch.maximum(-low, high)
        low = -high
    scale = (high - low) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-low / scale)
    return scale, zero


# ---- round to nearest -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(8, -1), (4, 128), (4, 32), (4, -1), (8, 64)])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, sym):
    W, _, _ = correlated_layer()
    W[3, :40] = 0  # an all-zero group
    W[5] = W[5].abs()  # a row without negative weights (asymmetric: zero point at its lower limit)
    w = rtn(W, bits, group_size, sym=sym)
    size = W.shape[1] if group_size == -1 else group_size
    assert (w.bits, w.group_size, w.g_idx) == (bits, size, None)
    assert w.scales.shape == (W.shape[0], math.ceil(W.shape[1] / size))
    groups = torch.arange(W.shape[1]) // size
    scale = w.scales[:, groups]
    deq = scale * (w.q.float() - w.zeros[:, groups])  # the formula itself, not QuantizedWeight's
    assert ((W - deq).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert torch.equal(w.scales.half().float(), w.scales)  # stored as fp16 exactly
    assert int(w.q.max()) <= 2**bits - 1
    if sym:
        assert (w.zeros == 2 ** (bits - 1)).all()
    else:
        assert (w.zeros >= 1).all() and (w.zeros <= 2**bits - 1).all() and (w.zeros == w.zeros.round()).all()
    # Rows with both signs: auto-gptq's grid, its fp32 scale rounded up to the next fp16 value.
    mixed = (W[:, :size].min(1).values < 0) & (W[:, :size].max(1).values > 0)
    ref_scale, ref_zero = auto_gptq_grid(W[mixed, :size], bits, sym)
    got = w.scales[mixed, 0]
    assert (got >= ref_scale).all() and (got <= ref_scale * (1 + 2**-10)).all()
    if sym:
        assert torch.equal(w.zeros[mixed, 0], ref_zero)
    expected_q = torch.clamp(torch.round(W[:, :size] / w.scales[:, :1]) + w.zeros[:, :1], 0, 2**bits - 1)
    assert torch.equal(w.q[:, :size].float(), expected_q)


# ---- GPTQ -----------------------------------------------------------------------------------------


def obs_reference(W, H, bits, group_size, sym, damp=0.01):
    """GPTQ the slow way (paper eq. 2-3, one column at a time with the full inverse Hessian of the
    columns left, no Cholesky, no blocks); grids fixed at each group's first column, as gptq()."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    scale = zero = None
    for c in range(n):
        if c % group_size == 0:
            s, z = auto_gptq_grid(W[:, c : c + group_size].float(), bits, sym)
            from qwenkit.quant.quantize import _fp16_at_least

            scale, zero = _fp16_at_least(s).double(), z.double()
        q = torch.clamp(torch.round(W[:, c] / scale) + zero, 0, 2**bits - 1)
        Q[:, c] = scale * (q - zero)
        err = (W[:, c] - Q[:, c]) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]  # OBS update of the columns left
        Hinv -= Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]  # remove column c (eq. 3)
    return Q.float()


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, -1), (8, -1)])
def test_gptq_matches_the_unblocked_algorithm(bits, group_size):
    W, _, H = correlated_layer(out_features=16, in_features=128)
    ref = obs_reference(W, H, bits, W.shape[1] if group_size == -1 else group_size, sym=True)
    got = gptq(W, H, bits, group_size, block=32).dequantize()  # blocks cut across groups too
    same = (got == ref).float().mean().item()
    assert same > 0.99  # rounding ties may fall differently in fp32 vs fp64
    assert layer_error(W, got, H) == pytest.approx(layer_error(W, ref, H), rel=0.02)


@pytest.mark.parametrize(
    "bits,group_size,sym", [(4, 128, True), (4, 32, False), (4, -1, True), (8, -1, False), (8, 128, True)]
)
def test_gptq_output_error_below_rtn(bits, group_size, sym):
    W, X, H = correlated_layer()
    rtn_error = layer_error(W, rtn(W, bits, group_size, sym=sym).dequantize(), H)
    for act_order in (False, True):
        w = gptq(W, H, bits, group_size, act_order=act_order, sym=sym)
        error = ((X @ W.t() - X @ w.dequantize().t()) ** 2).sum().item() / X.shape[0]  # ||XW^T - XQ^T||^2
        assert error == pytest.approx(layer_error(W, w.dequantize(), H), rel=1e-3)
        assert error < 0.8 * rtn_error, (act_order, error, rtn_error)
        assert (w.dequantize()[:, 7] == 0).all()  # the dead input's weights


def test_act_order_g_idx_is_the_group_of_each_column_in_quantization_order():
    W, _, H = correlated_layer(in_features=200)  # 200 = 6 groups of 32 and one of 8
    w = gptq(W, H, 4, 32, act_order=True)
    diagonal = H.diagonal().clone()
    diagonal[diagonal == 0] = 1  # a dead input counts as 1, as auto-gptq sets it before sorting
    order = torch.argsort(diagonal, descending=True)  # act-order: decreasing diag(H)
    assert w.g_idx is not None and w.g_idx.dtype == torch.int32 and w.scales.shape[1] == 7
    for g in range(7):
        members = set(torch.nonzero(w.g_idx == g).flatten().tolist())
        assert members == set(order[32 * g : 32 * (g + 1)].tolist())
    assert not torch.equal(w.g_idx.long(), torch.arange(200) // 32)  # really permuted
    deq = w.dequantize()  # each column on its own group's grid
    scale = w.scales[:, w.g_idx.long()]
    assert ((deq / scale + w.zeros[:, w.g_idx.long()]).round() == w.q.float()).all()
    without = gptq(W, H, 4, 32)
    assert without.g_idx is None


def test_bad_arguments_raise_one_line_errors():
    W, _, H = correlated_layer(in_features=64)
    for call, field in [
        (lambda: rtn(W, 3), "bits"),
        (lambda: rtn(W, 4, 0), "group_size"),
        (lambda: rtn(W[0], 4), "weight"),
        (lambda: gptq(W, H[:10, :10], 4), "H must be"),
        (lambda: gptq(W, H, 4, damp=0), "damp"),
        (lambda: check_method("int3", None, False), "unknown method"),
        (lambda: check_method("int8", None, True), "act_order"),
        (lambda: check_method("int4", 0, False), "group_size"),
    ]:
        with pytest.raises(QwenkitError, match=field) as e:
            call()
        assert "\n" not in str(e.value)


# ---- whole models, files ------------------------------------------------------------------------


def quantizable_model(seed=0):
    return randomize_biases(make_tiny_model(vocab_size=512, seed=seed, hidden_size=64, intermediate_size=128))


def unpack_auto_gptq(qweight, qzeros, bits):
    """auto-gptq's own unpacking (its torch QuantLinear): shifts of `bits` along rows / columns."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    q = (qweight.unsqueeze(1) >> shifts[None, :, None]) & mask  # [in/P, P, out]
    z = (qzeros.unsqueeze(2) >> shifts[None, None, :]) & mask  # [groups, out/P, P]
    return q.reshape(-1, qweight.shape[1]), z.reshape(qzeros.shape[0], -1) + 1


@pytest.mark.parametrize(
    "method,group_size,act_order,head",
    [
        ("int8", None, False, False),
        ("int4", 32, False, True),
        ("gptq-int4", 32, True, False),
        ("gptq-int8", None, False, False),
    ],
)
def test_quantize_save_load_gives_the_same_logits(
    tmp_path, byte_tokenizer, method, group_size, act_order, head
):
    model = quantizable_model()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    calibration = (
        calibration_batches(byte_tokenizer, None, samples=4, seq_len=64) if "gptq" in method else None
    )
    result = quantize_model(
        model,
        method,
        group_size,
        calibration,
        act_order=act_order,
        quantize_head=head,
        progress=False,
        replace=False,
    )
    assert len(result.weights) == 2 * 7 + head
    out = save_quantized(model, byte_tokenizer, tmp_path / "q", result)

    settings = json.loads((out / "quantize_config.json").read_text())
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]
        == settings
        == gptq_config(result)
    )
    assert (settings["bits"], settings["desc_act"], settings["sym"]) == (result.bits, act_order, True)
    assert settings["group_size"] == (-1 if method == "int8" else 32 if group_size else 128)
    assert (settings["quant_method"], settings["checkpoint_format"]) == ("gptq", "gptq")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    w = result.weights[name]
    q, zeros = unpack_auto_gptq(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], w.bits)
    assert torch.equal(q.t().to(torch.uint8), w.q)
    assert torch.equal(zeros.t().float(), w.zeros)
    assert torch.equal(tensors[f"{name}.scales"].t().float(), w.scales)
    assert torch.equal(tensors[f"{name}.g_idx"].long(), w.group_index())
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    assert f"{name}.weight" not in tensors and ("lm_head.qweight" in tensors) == head

    # The reference: the in-memory model with the files' fp16 rounding of the float parts.
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if module_name not in result.weights or pname == "bias":
                    p.copy_(p.half().float())
        expected = model(ids)
    loaded, _ = qwenkit.load(out)
    torch.testing.assert_close(loaded(ids), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_quantized_head_of_a_tied_model_is_stored_apart(tmp_path, byte_tokenizer):
    model = make_tiny_model(vocab_size=512, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    result = quantize_model(model, "int4", 32, quantize_head=True, progress=False, replace=False)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding stays float
    assert torch.equal(model.lm_head.weight, result.weights["lm_head"].dequantize())
    out = save_quantized(model, byte_tokenizer, tmp_path / "q", result)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((out / "quantize_config.json").read_text())["lm_head"] is True
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embedding.half().float())
        expected = model(ids)
    loaded, _ = qwenkit.load(out)
    torch.testing.assert_close(loaded(ids), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_replaced_layers_compute_the_dequantized_model(byte_tokenizer):
    model = quantizable_model()
    calibration = calibration_batches(byte_tokenizer, None, samples=2, seq_len=32)
    result = quantize_model(
        model, "gptq-int4", 32, calibration, act_order=True, progress=False, replace=False
    )
    ids = torch.randint(0, 256, (1, 16))
    expected = model(ids)  # float layers holding the dequantized weights
    replace_linears(model, result)
    from qwenkit.quant.linear import QuantLinear

    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert result.weights.keys() == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    torch.testing.assert_close(model(ids), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_gptq_model_closer_to_float_than_rtn(byte_tokenizer):
    """On held-out text, the GPTQ-int4 model's logits stay closer to the float model's than RTN's."""
    reference = quantizable_model()
    ids = torch.tensor([calibration_batches(byte_tokenizer, None, samples=1, seq_len=64)[0].tolist()])
    calibration = calibration_batches(byte_tokenizer, None, samples=8, seq_len=64)[1:]  # not ids
    expected = reference(ids)
    errors = {}
    for method in ("int4", "gptq-int4"):
        model = quantizable_model()
        quantize_model(
            model, method, 32, calibration if method != "int4" else None, progress=False, replace=False
        )
        errors[method] = ((model(ids) - expected) ** 2).mean().item()
    assert errors["gptq-int4"] < errors["int4"]


def test_quantize_model_errors(tmp_path, byte_tokenizer):
    model = quantizable_model()
    with pytest.raises(QwenkitError, match="tokenizer"):
        quantize_model(model, "gptq-int4", progress=False)
    text = tmp_path / "cal.txt"
    text.write_text("calibration text " * 20)
    result = quantize_model(
        model, "gptq-int4", 32, text, samples=2, seq_len=16, tokenizer=byte_tokenizer, progress=False
    )
    assert len(result.weights) == 14
    with pytest.raises(QwenkitError, match="already quantized"):
        quantize_model(model, "int8", progress=False)


def test_calibration_from_chat_and_text_files(tmp_path, byte_tokenizer):
    from qwenkit.chatml import render_messages

    chats = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(3)
    ]
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    batches = calibration_batches(byte_tokenizer, chat_file, samples=100, seq_len=16)
    expected = []
    for c in chats:
        expected += render_messages(byte_tokenizer, c["messages"]).input_ids + [byte_tokenizer.eod_id]
    assert torch.cat(batches).tolist() == expected
    assert all(len(b) == 16 for b in batches[:-1])
    text_file = tmp_path / "plain.txt"
    text_file.write_text("some plain text " * 10)
    assert (
        torch.cat(calibration_batches(byte_tokenizer, text_file, 1, 20)).tolist()
        == byte_tokenizer.encode("some plain text " * 10)[:20]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(chats[0]) + "\n" + json.dumps({"messages": [{"role": "pilot", "content": "x"}]}) + "\n"
    )
    with pytest.raises(QwenkitError, match="sample 2"):
        calibration_batches(byte_tokenizer, bad, 10, 16)
    with pytest.raises(QwenkitError, match="not found"):
        calibration_batches(byte_tokenizer, tmp_path / "missing.jsonl", 10, 16)
    with pytest.warns(UserWarning, match="built-in"):
        assert len(calibration_batches(byte_tokenizer, None, 3, 50)) == 3


@pytest.mark.slow
def test_transformers_loads_what_quantize_writes(tmp_path, byte_tokenizer):
    """transformers' GPTQ integration (optimum + gptqmodel's CPU kernels) reads the files."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    model = randomize_biases(make_tiny_model(vocab_size=512, hidden_size=128, intermediate_size=256))
    calibration = calibration_batches(byte_tokenizer, None, samples=2, seq_len=32)
    result = quantize_model(
        model, "gptq-int4", 64, calibration, act_order=True, progress=False, replace=False
    )
    out = save_quantized(model, byte_tokenizer, tmp_path / "q", result)
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    assert hasattr(hf.model.layers[0].mlp.down_proj, "qweight")  # a GPTQ kernel module, not nn.Linear
    ids = torch.randint(0, 256, (1, 20))
    ours, _ = qwenkit.load(out)
    expected = ours(ids)
    with torch.no_grad():
        got = hf(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-3 * expected.abs().max().item())


# ---- the command -----------------------------------------------------------------------------------


def test_cli_quantize_writes_a_checkpoint_that_loads(tmp_path, small_checkpoint, capsys):
    out = tmp_path / "int4"
    assert (
        main(
            [
                "quantize",
                "--model",
                str(small_checkpoint),
                "--out",
                str(out),
                "--method",
                "int4",
                "--group-size",
                "32",
            ]
        )
        == 0
    )
    assert "int4 (group size 32, sym)" in capsys.readouterr().out
    model, _ = qwenkit.load(small_checkpoint)
    reference = quantize_model(model, "int4", 32, progress=False, replace=False)
    written = load_file(out / "model.safetensors")
    w = reference.weights["model.layers.0.mlp.up_proj"]
    assert torch.equal(written["model.layers.0.mlp.up_proj.scales"].t().float(), w.scales)
    loaded, _ = qwenkit.load(out)
    ids = torch.randint(0, 256, (1, 12))
    expected = model(ids)
    torch.testing.assert_close(loaded(ids), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())

    chat = tmp_path / "cal.jsonl"
    turns = [{"role": "user", "content": "a b c " * 10}, {"role": "assistant", "content": "d e f " * 10}]
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    gptq_out = tmp_path / "gptq"
    args = ["quantize", "--model", str(small_checkpoint), "--out", str(gptq_out), "--method", "gptq-int8"]
    assert main([*args, "--calibration", str(chat), "--samples", "2", "--seq-len", "32", "--act-order"]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 2 sequences, 64 tokens" in printed and "act-order" in printed
    assert json.loads((gptq_out / "quantize_config.json").read_text())["desc_act"] is True
    assert qwenkit.load(gptq_out)[0](ids).shape == expected.shape


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--method", "int3"], 2, "invalid choice"),
        (["--method", "int4", "--group-size", "0"], 2, "invalid group size"),
        (["--method", "int8", "--act-order"], 1, "act_order needs a GPTQ method"),
        (["--method", "int4", "--calibration", "x.jsonl"], 1, "--calibration is for the GPTQ methods"),
        (["--method", "gptq-int4", "--calibration", "missing.jsonl"], 1, "not found"),
        (["--method", "gptq-int4", "--samples", "0"], 2, "positive integer"),
        (["--method", "int4", "--damp", "2"], 2, "invalid damp"),
    ],
)
def test_cli_usage_errors(tmp_path, small_checkpoint, capsys, extra, code, message):
    assert main(["quantize", "--model", str(small_checkpoint), "--out", str(tmp_path / "o"), *extra]) == code
    err = capsys.readouterr().err
    assert message in err
    if code == 1:
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_cli_refuses_a_quantized_model_and_occupied_output(tmp_path, small_checkpoint, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(small_checkpoint), "--out", str(out), "--method", "int8"]) == 0
    again = ["quantize", "--model", str(out), "--out", str(tmp_path / "qq"), "--method", "int4"]
    assert main(again) == 1
    assert "already quantized" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    assert main(["quantize", "--model", str(small_checkpoint), "--out", str(busy), "--method", "int8"]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err
    shutil.rmtree(busy)
