"""Checkpoint directories: the original Qwen layout, the Qwen2 layout, transformers round trips, errors."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import make_tiny_model, randomize_biases
from safetensors.torch import save_file

import qwenkit
from qwenkit import Qwen, QwenConfig, QwenkitError
from qwenkit.checkpoint import describe

IDS = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 108386, 12345]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def write_original_layout(model: Qwen, directory, vocab_path, shards: int = 2) -> None:
    """A checkpoint as the official Qwen release lays it out (QWenLMHeadModel), from the same weights."""
    config = model.config
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "transformer.wte.weight": model.model.embed_tokens.weight,
        "transformer.ln_f.weight": model.model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.model.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"transformer.h.{i}."
        state[p + "ln_1.weight"] = layer.input_layernorm.weight
        state[p + "ln_2.weight"] = layer.post_attention_layernorm.weight
        state[p + "attn.c_attn.weight"] = torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        )
        state[p + "attn.c_attn.bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        state[p + "attn.c_proj.weight"] = attn.o_proj.weight
        state[p + "mlp.w1.weight"] = mlp.up_proj.weight
        state[p + "mlp.w2.weight"] = mlp.gate_proj.weight
        state[p + "mlp.c_proj.weight"] = mlp.down_proj.weight
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    names = list(state)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[s::shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    hf_config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size * 2,
        "kv_channels": config.head_dim,
        "layer_norm_epsilon": config.rms_norm_eps,
        "max_position_embeddings": 32768,
        "no_bias": True,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "rotary_emb_base": config.rope_theta,
        "rotary_pct": 1.0,
        "seq_length": config.max_position_embeddings,
        "tie_word_embeddings": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": config.vocab_size,
    }
    (directory / "config.json").write_text(json.dumps(hf_config))
    generation = {
        "chat_format": "chatml",
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "max_window_size": 6144,
        "max_new_tokens": 512,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation))
    shutil.copyfile(vocab_path, directory / "qwen.tiktoken")


@pytest.fixture
def original_checkpoint(tmp_path, tiny_model, official_tokenizer):
    write_original_layout(tiny_model, tmp_path / "qwen-original", official_tokenizer.path)
    return tiny_model, tmp_path / "qwen-original"


def test_original_layout_loads_with_the_same_logits(original_checkpoint):
    model, directory = original_checkpoint
    loaded, tokenizer = qwenkit.load(directory)
    assert loaded.config.intermediate_size == model.config.intermediate_size
    assert loaded.config.use_dynamic_ntk and loaded.config.use_logn_attn
    assert loaded.generation_config.repetition_penalty == 1.1
    assert tokenizer.im_end_id == 151645
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    assert describe(directory)["layout"].startswith("original Qwen")


def test_original_layout_converts_to_qwen2_that_transformers_loads(original_checkpoint, tmp_path):
    model, directory = original_checkpoint
    loaded, tokenizer = qwenkit.load(directory)
    qwenkit.save(loaded, tokenizer, tmp_path / "converted")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(model), atol=1e-4, rtol=0)
    again, _ = qwenkit.load(tmp_path / "converted")
    assert again.config.use_dynamic_ntk  # qwenkit's own switches survive in the "qwenkit" key
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "tie_word_embeddings": True}])
def test_saved_checkpoint_loads_in_transformers(tmp_path, official_tokenizer, overrides):
    model = randomize_biases(make_tiny_model(**overrides))
    qwenkit.save(model, official_tokenizer, tmp_path / "out", max_shard_bytes=8_000_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(model), atol=1e-4, rtol=0)
    greedy = model.generate(IDS, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    theirs = hf.generate(IDS, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=151643)
    assert greedy.tolist() == theirs.tolist()


def test_qwen2_checkpoint_written_by_transformers_loads(tmp_path, official_tokenizer):
    hf_config = transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(QwenkitError, match="qwen.tiktoken"):
        qwenkit.load(tmp_path / "hf")
    shutil.copyfile(official_tokenizer.path, tmp_path / "hf" / "qwen.tiktoken")
    model, _ = qwenkit.load(tmp_path / "hf")
    assert model.config.rope_theta == 1000000.0 and model.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(logits(model), hf(IDS).logits, atol=1e-4, rtol=0)


def test_pytorch_bin_checkpoints_load(tmp_path, tiny_model, tiny_checkpoint):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (directory / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), directory / "pytorch_model.bin")
    loaded, _ = qwenkit.load(directory)
    torch.testing.assert_close(logits(loaded), logits(tiny_model), atol=0, rtol=0)


def test_dtypes(tmp_path, tiny_model, official_tokenizer):
    qwenkit.save(tiny_model, official_tokenizer, tmp_path / "bf16", dtype="bfloat16")
    info = describe(tmp_path / "bf16")
    assert info["stored_dtypes"] == ["bfloat16"]
    loaded, _ = qwenkit.load(tmp_path / "bf16")  # float32 on CPU by default
    assert loaded.dtype == torch.float32
    loaded, _ = qwenkit.load(tmp_path / "bf16", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(QwenkitError, match="unsupported dtype 'int3'"):
        qwenkit.load(tmp_path / "bf16", dtype="int3")


def corrupt(directory, change):
    """Rewrite model.safetensors with `change(state)` applied."""
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    change(state)
    save_file(state, directory / "model.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
            "missing tensors: model.layers.1.mlp.up_proj.weight",
        ),
        (
            lambda s: s.update({"model.layers.9.extra": torch.zeros(2)}),
            "unexpected tensors: model.layers.9.extra",
        ),
        (
            lambda s: s.update({"model.norm.weight": torch.ones(65)}),
            r"mis-shaped tensors: model.norm.weight \(65,\)",
        ),
    ],
)
def test_mismatched_tensors_are_named(tmp_path, tiny_checkpoint, change, message):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    corrupt(directory, change)
    with pytest.raises(QwenkitError, match=message):
        qwenkit.load(directory)


def test_bad_directories(tmp_path):
    with pytest.raises(QwenkitError, match="checkpoint not found"):
        qwenkit.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QwenkitError, match="no config.json"):
        qwenkit.load(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QwenkitError, match="unknown checkpoint layout"):
        qwenkit.load(tmp_path / "llama")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(QwenkitError, match="not valid JSON"):
        qwenkit.load(tmp_path / "broken")


def test_save_replaces_atomically(tmp_path, tiny_model, official_tokenizer):
    qwenkit.save(tiny_model, official_tokenizer, tmp_path / "ckpt")
    qwenkit.save(tiny_model, official_tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directories left behind


def test_loading_is_lazy(tmp_path, official_tokenizer):
    """Peak resident memory while loading is the model plus one tensor being converted, never a second
    full copy (a loader that reads the whole state dict first would need twice the model's size)."""
    model = Qwen(QwenConfig.from_preset("tiny", hidden_size=512, intermediate_size=1408, num_hidden_layers=6))
    qwenkit.save(model, official_tokenizer, tmp_path / "big")
    size_mb = model.config.num_parameters * 4 / 2**20
    largest_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20  # the head, laid out anew for CPU
    del model
    script = textwrap.dedent(f"""
        import re, torch, qwenkit

        def peak_mb():  # VmHWM: this process's own peak (ru_maxrss can carry the parent's over exec)
            return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

        before = peak_mb()
        model, _ = qwenkit.load({str(tmp_path / "big")!r})
        with torch.no_grad():
            total = sum(float(p.sum()) for p in model.parameters())  # touch every weight
        print(peak_mb() - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mb = float(out.stdout.split()[-1])
    assert 0.8 * size_mb < growth_mb < 1.15 * (size_mb + largest_mb) < 2 * size_mb, (growth_mb, size_mb)


def test_saved_checkpoint_has_tokenizer_files_transformers_reads(tiny_checkpoint, official_tokenizer):
    assert (tiny_checkpoint / "qwen.tiktoken").read_bytes() == official_tokenizer.path.read_bytes()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "你好，Qwen! def f(x):\n    return 12345"
    assert hf_tokenizer.encode(text) == official_tokenizer.encode(text)
    assert hf_tokenizer.eos_token == "<|im_end|>"
    generation = transformers.GenerationConfig.from_pretrained(tiny_checkpoint)
    assert generation.eos_token_id == [151643, 151645]  # chat turns end at <|im_end|> elsewhere too
    loaded, _ = qwenkit.load(tiny_checkpoint)
    assert loaded.generation_config.stop_sequences()[:2] == [[151643], [151645]]


def rewrite_header(file, change) -> None:
    """Apply `change(header)` to a safetensors file's JSON header; the data stays as it is."""
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: f.write_bytes(f.read_bytes()[:-100]),
            r"model.safetensors is truncated: its header describes [\d,]+ bytes of tensor data, the file "
            r"holds [\d,]+",
        ),
        (
            lambda f: f.write_bytes(f.read_bytes() + bytes(8)),
            "model.safetensors is longer than its header says",
        ),
        (
            lambda f: rewrite_header(f, lambda h: h["model.norm.weight"].update(shape=[65])),
            "model.safetensors has a corrupt safetensors header: tensor model.norm.weight's shape and offsets",
        ),
        (
            lambda f: rewrite_header(f, lambda h: h["model.norm.weight"].update(data_offsets=[8, 4])),
            "model.norm.weight's shape and offsets disagree",
        ),
        (lambda f: f.write_bytes(f.read_bytes()[:40]), "model.safetensors has a corrupt safetensors header"),
        (lambda f: f.write_bytes(b""), r"model.safetensors is not a safetensors file \(header size 0\)"),
    ],
)
def test_damaged_safetensors_are_named_by_load_and_describe(small_checkpoint, tmp_path, damage, message):
    directory = shutil.copytree(small_checkpoint, tmp_path / "ckpt")
    damage(directory / "model.safetensors")
    for read in (qwenkit.load, describe):
        with pytest.raises(QwenkitError, match=message):
            read(directory)


def test_truncated_pytorch_bin_is_named(small_checkpoint, tmp_path):
    directory = shutil.copytree(small_checkpoint, tmp_path / "ckpt")
    model, _ = qwenkit.load(directory)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    data = (directory / "pytorch_model.bin").read_bytes()
    (directory / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    for read in (qwenkit.load, describe):
        with pytest.raises(QwenkitError, match="cannot read .*pytorch_model.bin: "):
            read(directory)


@pytest.fixture
def transformers_log():
    """What transformers logs (warnings included) while the test runs."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    transformers.logging.add_handler(handler)
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        yield stream
    finally:
        transformers.logging.set_verbosity(before)
        transformers.logging.remove_handler(handler)


def test_saved_files_are_what_transformers_expects(small_checkpoint, byte_tokenizer, transformers_log):
    """Token ids from the checkpoint's own (byte-level) vocabulary, no key transformers does not know,
    no length limit that overrides the caller's, no warnings on load."""
    config = json.loads((small_checkpoint / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == byte_tokenizer.eod_id < config["vocab_size"]
    assert config["transformers_version"] == transformers.__version__
    saved = json.loads((small_checkpoint / "generation_config.json").read_text())
    assert not set(saved) - set(transformers.GenerationConfig().to_dict())  # keys transformers reads
    assert "max_new_tokens" not in saved
    assert saved["eos_token_id"] == [byte_tokenizer.eod_id, byte_tokenizer.im_end_id]
    hf = transformers.AutoModelForCausalLM.from_pretrained(small_checkpoint, dtype=torch.float32).eval()
    transformers.AutoTokenizer.from_pretrained(small_checkpoint)
    generation = transformers.GenerationConfig.from_pretrained(small_checkpoint)
    assert generation.pad_token_id == byte_tokenizer.pad_id and generation.top_p == 0.8
    prompt = torch.tensor([[72, 105, 33]])
    for limit in ({"max_new_tokens": 5}, {"max_length": 8}):  # lm-eval passes max_length
        out = hf.generate(prompt, do_sample=False, **limit)
        assert out.shape[1] == 8, limit
    log = transformers_log.getvalue()
    assert log == "", log  # nothing at all: no bos/eos outside the vocabulary, no regex, no flag warnings


def test_saved_directories_are_readable_as_the_umask_allows(tmp_path, byte_tokenizer):
    model = make_tiny_model(vocab_size=512, num_hidden_layers=1)
    for umask, directory_mode, file_mode in [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]:
        before = os.umask(umask)
        try:
            out = qwenkit.save(model, byte_tokenizer, tmp_path / f"ckpt-{umask:o}")
        finally:
            os.umask(before)
        assert stat.S_IMODE(out.stat().st_mode) == directory_mode
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(
            [p.name for p in out.iterdir()], file_mode
        )


def test_qwenkit_generation_settings_survive_a_save(tmp_path, small_checkpoint, byte_tokenizer):
    model, _ = qwenkit.load(small_checkpoint)
    model.generation_config = model.generation_config.updated(
        max_new_tokens=77, chat_format="raw", stop_words_ids=[[5, 6]], max_window_size=999, top_k=3
    )
    qwenkit.save(model, byte_tokenizer, tmp_path / "out")
    expected = model.generation_config.updated(eos_token_id=256)  # a raw model ends at <|endoftext|> only
    assert qwenkit.load(tmp_path / "out")[0].generation_config == expected
    # a checkpoint from before qwenkit_generation.json: the extras in generation_config.json still count
    old = shutil.copytree(tmp_path / "out", tmp_path / "old")
    extras = json.loads((old / "qwenkit_generation.json").read_text())
    (old / "qwenkit_generation.json").unlink()
    settings = json.loads((old / "generation_config.json").read_text())
    (old / "generation_config.json").write_text(json.dumps({**settings, **extras, "vocab_size": None}))
    assert qwenkit.load(old)[0].generation_config == expected


def test_without_a_tokenizer_no_token_id_is_guessed(tmp_path):
    model = make_tiny_model(vocab_size=512, num_hidden_layers=1)
    out = qwenkit.save(model, None, tmp_path / "weights-only")
    config = json.loads((out / "config.json").read_text())
    assert "bos_token_id" not in config and "eos_token_id" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert "eos_token_id" not in generation and "pad_token_id" not in generation  # 151643 > 512
