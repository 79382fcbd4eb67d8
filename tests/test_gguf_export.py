"""GGUF export: read back with the gguf package's own reader (metadata, tensors, tokenizer round trip)."""

import json
import os
import shutil
import stat

import gguf
import numpy as np
import pytest
from conftest import make_tiny_model, randomize_biases
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

import qwenkit
from qwenkit import QwenkitError
from qwenkit.chatml import CHAT_TEMPLATE
from qwenkit.cli import main
from qwenkit.gguf_export import export_gguf
from qwenkit.tokenizer import PAT_STR, Tokenizer

MIXED = (
    "Hello world! 你好，世界。 def f(x):\n    return x ** 2  # 12345\n\n"
    "ünïcödé  spaces\t\ttabs 🙂 it's we'll <|im_start|>user\nhi<|im_end|>"
)
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A one-layer model over a vocabulary qwenkit trained (llama.cpp's converter refuses these), with
    embedding rows beyond the tokenizer's ids and a feed-forward width q8_0 cannot block (176)."""
    from qwenkit.tokenizer_train import train_vocab

    root = tmp_path_factory.mktemp("gguf")
    corpus = root / "corpus.txt"
    corpus.write_text(
        ("hello world, 你好世界! numbers 12345 and code: def f(x): return x\n" * 30) + "ünïcödé\n"
    )
    tokenizer = Tokenizer(train_vocab([corpus], 330, progress=False))
    tokenizer.save(root / "qwen.tiktoken")
    tokenizer = Tokenizer.from_file(root / "qwen.tiktoken")
    model = randomize_biases(make_tiny_model(vocab_size=576, num_hidden_layers=1))
    return qwenkit.save(model, tokenizer, root / "ckpt")


def read(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def as_float(tensor) -> np.ndarray:
    """A tensor read back, as float32 in PyTorch's layout ([out, in] for matrices)."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_export_writes_llama_cpps_qwen2_layout(trained_checkpoint, tmp_path, kind):
    model, tokenizer = qwenkit.load(trained_checkpoint)
    out = export_gguf(trained_checkpoint, tmp_path / "m.gguf", kind)
    meta, tensors = read(out)
    c = model.config
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[kind]
    assert {k: meta[k] for k in meta if k.startswith(("general.", "qwen2."))} == {
        "general.architecture": "qwen2",
        "general.name": "ckpt",
        "general.type": "model",
        "general.file_type": file_type,
        "general.quantization_version": 2,
        "qwen2.context_length": c.max_position_embeddings,
        "qwen2.embedding_length": c.hidden_size,
        "qwen2.feed_forward_length": c.intermediate_size,
        "qwen2.block_count": 1,
        "qwen2.attention.head_count": c.num_attention_heads,
        "qwen2.attention.head_count_kv": c.num_key_value_heads,
        "qwen2.attention.key_length": c.head_dim,
        "qwen2.attention.value_length": c.head_dim,
        "qwen2.rope.freq_base": pytest.approx(c.rope_theta),
        "qwen2.attention.layer_norm_rms_epsilon": pytest.approx(c.rms_norm_eps),
    }
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.padding_token_id"] == tokenizer.eod_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.im_end_id  # a chat checkpoint ends at <|im_end|>
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE

    state = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}  # fmt: skip
    block = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
             "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}  # fmt: skip
    block |= {f"attn_{p}.{s}": f"self_attn.{p}_proj.{s}" for p in "qkv" for s in ("weight", "bias")}
    names |= {f"blk.0.{k}": f"model.layers.0.{v}" for k, v in block.items()}
    assert set(tensors) == set(names)
    matrix = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[kind]
    for name, ours in names.items():
        tensor, expected = tensors[name], state[ours].float().numpy()
        assert tensor.shape.tolist() == list(reversed(expected.shape)), name  # GGUF lists dims inner first
        if expected.ndim == 1:
            assert tensor.tensor_type == Q.F32, name  # norms and biases stay f32
            np.testing.assert_array_equal(as_float(tensor), expected)
        elif kind == "q8_0" and name.endswith("ffn_down.weight"):  # rows of 176: f16, as llama.cpp
            assert tensor.tensor_type == Q.F16
        elif kind == "q8_0":
            assert tensor.tensor_type == Q.Q8_0, name
            # one f16 scale per 32 values: error at most half a step (plus the scale's own rounding)
            bound = 0.6 * np.abs(expected).max() / 127
            assert np.abs(as_float(tensor) - expected).max() <= bound, name
        else:
            assert tensor.tensor_type == matrix, name
            np.testing.assert_array_equal(
                as_float(tensor), expected.astype(np.float16 if kind == "f16" else np.float32)
            )


def rebuilt_tokenizer(meta: dict) -> HFTokenizer:
    """A `tokenizers` BPE built only from the GGUF's tokens, types and merges, with the Qwen2
    pre-tokenizer llama.cpp applies for pre "qwen2" (the regex, then bytes -> printable characters)."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {
        t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == gguf.TokenType.NORMAL
    }
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    hf.decoder = decoders.ByteLevel()
    for i, (t, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            hf.add_special_tokens([AddedToken(t, special=kind == gguf.TokenType.CONTROL, normalized=False)])
            assert hf.token_to_id(t) == i
    return hf


def test_tokenizer_round_trip_and_padding_rows(trained_checkpoint, tmp_path):
    _, tokenizer = qwenkit.load(trained_checkpoint)
    meta, _ = read(export_gguf(trained_checkpoint, tmp_path / "m.gguf", "f16"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 576
    n, added = tokenizer.n_bpe, tokenizer.vocab_size
    assert types[:n] == [gguf.TokenType.NORMAL] * n
    assert types[n:added] == [gguf.TokenType.CONTROL] * (added - n)
    assert tokens[n:added] == sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    assert tokens[added:] == [f"[PAD{i}]" for i in range(added, 576)]
    assert types[added:] == [gguf.TokenType.UNUSED] * (576 - added)
    assert len(meta["tokenizer.ggml.merges"]) == n - 256
    hf = rebuilt_tokenizer(meta)
    assert hf.encode(MIXED).ids == tokenizer.encode(MIXED, allowed_special="all")
    assert hf.decode(tokenizer.encode(MIXED)) == MIXED


@pytest.mark.slow  # the gguf reader parses 151,936 tokens and 151,387 merges one by one
def test_official_vocabulary_export(tmp_path, tiny_checkpoint, official_tokenizer):
    """The official vocabulary: 151,643 ranks, 208 control tokens, 85 padding rows of 151,936."""
    meta, _ = read(export_gguf(tiny_checkpoint, tmp_path / "m.gguf", "q8_0"))
    types = meta["tokenizer.ggml.token_type"]
    assert types.count(gguf.TokenType.NORMAL) == 151643 and types.count(gguf.TokenType.CONTROL) == 208
    assert types.count(gguf.TokenType.UNUSED) == 151936 - 151851
    assert meta["tokenizer.ggml.tokens"][151644] == "<|im_start|>"
    assert meta["tokenizer.ggml.eos_token_id"] == 151645 and meta["tokenizer.ggml.bos_token_id"] == 151643
    assert rebuilt_tokenizer(meta).encode(MIXED).ids == official_tokenizer.encode(
        MIXED, allowed_special="all"
    )


@pytest.mark.slow
def test_qwen25_checkpoint_export(tmp_path, qwen25_dir):
    """A Qwen2.5 checkpoint as published (tokenizer.json, no qwen.tiktoken): its own tokenizer.json
    tokens and merges, <tool_call> and the FIM tokens user-defined (not special there), its eos
    <|im_end|>, its chat template, no output tensor (tied)."""
    meta, tensors = read(export_gguf(qwen25_dir, tmp_path / "m.gguf", "f16"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 151936 and tokens[151657] == "<tool_call>"
    assert types[151657] == types[151659] == gguf.TokenType.USER_DEFINED
    assert types[151644] == types[151656] == gguf.TokenType.CONTROL
    assert types[151665:] == [gguf.TokenType.UNUSED] * (151936 - 151665)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (151643, 151645)
    config = json.loads((qwen25_dir / "tokenizer_config.json").read_text())
    assert meta["tokenizer.chat_template"] == config.get("chat_template", CHAT_TEMPLATE)
    hf = json.loads((qwen25_dir / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.merges"] == [
        m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]
    ]
    assert "output.weight" not in tensors and len(tensors) == 2 + 2 * 12


def test_original_layout_exports(tmp_path, trained_checkpoint):
    """A checkpoint in the original Qwen layout (fused c_attn, w1/w2), which qwenkit.load converts;
    no tokenizer.json there, so the vocabulary is derived from qwen.tiktoken."""
    from test_checkpoint import write_original_layout

    model, tokenizer = qwenkit.load(trained_checkpoint)
    write_original_layout(model, tmp_path / "orig", trained_checkpoint / "qwen.tiktoken", shards=1)
    meta, tensors = read(export_gguf(tmp_path / "orig", tmp_path / "m.gguf", "f32"))
    reference, _ = read(export_gguf(trained_checkpoint, tmp_path / "ref.gguf", "f32"))
    assert meta["tokenizer.ggml.merges"] == reference["tokenizer.ggml.merges"]
    assert meta["tokenizer.ggml.tokens"] == reference["tokenizer.ggml.tokens"]
    assert rebuilt_tokenizer(meta).encode(MIXED).ids == tokenizer.encode(MIXED, allowed_special="all")
    for name, layer in (
        ("q", model.model.layers[0].self_attn.q_proj),
        ("v", model.model.layers[0].self_attn.v_proj),
    ):
        np.testing.assert_array_equal(
            as_float(tensors[f"blk.0.attn_{name}.weight"]), layer.weight.detach().numpy()
        )
        np.testing.assert_array_equal(
            as_float(tensors[f"blk.0.attn_{name}.bias"]), layer.bias.detach().numpy()
        )
    gate = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    np.testing.assert_array_equal(as_float(tensors["blk.0.ffn_gate.weight"]), gate)


def test_tied_head_has_no_output_tensor(tmp_path, trained_checkpoint):
    _, tokenizer = qwenkit.load(trained_checkpoint)
    model = make_tiny_model(vocab_size=576, num_hidden_layers=1, tie_word_embeddings=True)
    qwenkit.save(model, tokenizer, tmp_path / "tied")
    before = os.umask(0o022)
    try:
        out = export_gguf(tmp_path / "tied", tmp_path / "m.gguf", "f32")
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # readable like any written file, not mkstemp's 0o600
    _, tensors = read(out)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_bfloat16_checkpoint_keeps_its_values(tmp_path, trained_checkpoint):
    """Loaded in its own dtype (not float32: half the memory), every bfloat16 value written exactly."""
    model, tokenizer = qwenkit.load(trained_checkpoint)
    qwenkit.save(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    _, tensors = read(export_gguf(tmp_path / "bf16", tmp_path / "m.gguf", "f32"))
    expected = model.model.layers[0].mlp.up_proj.weight.detach().bfloat16().float().numpy()
    np.testing.assert_array_equal(as_float(tensors["blk.0.ffn_up.weight"]), expected)


def test_bad_requests_are_named(tmp_path, trained_checkpoint, small_checkpoint):
    with pytest.raises(QwenkitError, match="unknown GGUF type 'q4_k'"):
        export_gguf(trained_checkpoint, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(QwenkitError, match="is a directory"):
        export_gguf(trained_checkpoint, tmp_path, "f16")
    with pytest.raises(QwenkitError, match="no BPE merges"):  # a bytes-only vocabulary
        export_gguf(small_checkpoint, tmp_path / "m.gguf", "f16")
    with pytest.raises(QwenkitError, match="checkpoint not found"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf", "f16")
    windowed = tmp_path / "windowed"
    shutil.copytree(trained_checkpoint, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config["qwenkit"].update(use_window_attn=True, window_sizes=[64])
    (windowed / "config.json").write_text(json.dumps(config))
    with pytest.raises(QwenkitError, match=r"windows shorter than its training length \(64 < 256\)"):
        export_gguf(windowed, tmp_path / "m.gguf", "f16")
    shutil.rmtree(windowed)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written left behind


def test_cli_export_gguf(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "model-q8.gguf"
    assert main(["export", "gguf", str(trained_checkpoint), str(out), "--type", "q8_0"]) == 0
    assert str(out) in capsys.readouterr().out
    assert read(out)[0]["general.file_type"] == 7
    assert main(["export", "gguf", str(tmp_path / "nope"), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qwenkit: error: ") and "checkpoint not found" in err and err.count("\n") == 1
