"""LoRA adapters: peft format, interchangeable with transformers' Qwen2, merge, and the CLI."""

import pytest
import torch
from conftest import make_tiny_model, to_transformers

import qwenkit
from qwenkit import Qwen, QwenkitError
from qwenkit.cli import main
from qwenkit.lora import add_lora, load_adapter, merge_adapter

IDS = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 108386]])


@pytest.fixture
def adapter(tmp_path):
    """A trained-looking adapter: LoRA B matrices (zero at init) and the embedding copies set randomly."""
    model = add_lora(make_tiny_model("tiny-gqa"), r=8, alpha=16, dropout=0.0, train_embeddings=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        reference = model(IDS)
    return tmp_path / "adapter", reference


def test_only_lora_weights_train_by_default():
    model = add_lora(make_tiny_model("tiny-gqa"), r=64, alpha=16, dropout=0.05)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}  # fmt: skip
    assert model.peft_config["default"].r == 64 and model.peft_config["default"].lora_alpha == 16


def test_adapter_loads_with_peft_onto_transformers_qwen2(adapter):
    import peft

    path, reference = adapter
    hf = peft.PeftModel.from_pretrained(to_transformers(make_tiny_model("tiny-gqa")), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, reference, atol=1e-4, rtol=0)


def test_merged_weights_give_the_adapted_logits(adapter, tmp_path, official_tokenizer):
    path, reference = adapter
    merged = merge_adapter(make_tiny_model("tiny-gqa"), path)
    assert isinstance(merged, Qwen)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(make_tiny_model("tiny-gqa"), path)(IDS), reference, atol=1e-6, rtol=0
        )

    qwenkit.save(make_tiny_model("tiny-gqa"), official_tokenizer, tmp_path / "base")
    loaded, _ = qwenkit.load(tmp_path / "base", adapter=path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), reference, atol=1e-5, rtol=0)
    half, _ = qwenkit.load(tmp_path / "base", adapter=path, weights="bf16")  # merged in fp32, then 16-bit
    assert type(half.model.layers[0].self_attn.q_proj).__name__ == "HalfLinear"
    with torch.no_grad():
        torch.testing.assert_close(half(IDS), reference, atol=0.05, rtol=0)
    assert main(["merge-lora", str(tmp_path / "base"), str(path), str(tmp_path / "merged")]) == 0
    written, _ = qwenkit.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(written(IDS), reference, atol=1e-5, rtol=0)


def test_bad_adapters(tmp_path, official_tokenizer, capsys):
    qwenkit.save(make_tiny_model("tiny-gqa"), official_tokenizer, tmp_path / "base")
    with pytest.raises(QwenkitError, match="adapter not found"):
        qwenkit.load(tmp_path / "base", adapter=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QwenkitError, match="not a LoRA adapter"):
        qwenkit.load(tmp_path / "base", adapter=tmp_path / "empty")
    assert main(["generate", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "empty"),
                 "--prompt", "hi", "--max-new-tokens", "2"]) == 1  # fmt: skip
    assert "not a LoRA adapter" in capsys.readouterr().err
