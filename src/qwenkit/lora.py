"""LoRA adapters through peft, interchangeable with transformers' Qwen2 models.

qwenkit's module names are transformers' Qwen2 names (`model.layers.N.self_attn.q_proj`, ...,
`lm_head`), so an adapter trained here loads with peft onto `Qwen2ForCausalLM` and the other way
round. Defaults are the official fine-tuning script's: r=64, alpha=16, dropout 0.05 on every
attention and MLP projection; base (non-chat) models also train the embeddings and the head,
since they never saw the ChatML tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.model import Qwen

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft():
    try:
        import peft
    except ImportError:
        raise QwenkitError("LoRA needs the peft package: pip install 'qwenkit[lora]'") from None
    return peft


def add_lora(
    model: Qwen, r: int = 64, alpha: int = 16, dropout: float = 0.05, train_embeddings: bool = False
):
    """Wrap `model` in a peft model whose only trainable weights are the LoRA matrices (and, with
    `train_embeddings`, full copies of the embedding and the head)."""
    peft = _peft()
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        bias="none",
        modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None,
    )
    return peft.get_peft_model(model, config)


def quantize_nf4(model: Qwen, compute_dtype) -> Qwen:
    """Q-LoRA's base: every LoRA target projection stored as 4-bit NF4 (bitsandbytes), computed in
    `compute_dtype`; embeddings, norms and the head stay as they are."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QwenkitError("Q-LoRA needs the bitsandbytes package: pip install 'qwenkit[qlora]'") from None
    from torch import nn

    device = model.lm_head.weight.device
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in LORA_TARGETS:
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=compute_dtype, quant_type="nf4")  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data.contiguous(), requires_grad=False, quant_type="nf4"
                )
                if child.bias is not None:
                    quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, quantized.to(device))  # moving to the device quantizes
    return model


def check_adapter_dir(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise QwenkitError(f"adapter not found: {directory}")
    if not (directory / "adapter_config.json").is_file():
        raise QwenkitError(f"{directory} is not a LoRA adapter (no adapter_config.json, as peft writes it)")
    return directory


def load_adapter(model: Qwen, path: str | os.PathLike):
    """`model` with the adapter at `path` applied (a peft model, adapter weights kept apart)."""
    peft = _peft()
    directory = check_adapter_dir(path)
    try:
        return peft.PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, RuntimeError) as e:
        raise QwenkitError(f"cannot apply the adapter {directory}: {str(e).splitlines()[0]}") from None


def merge_adapter(model: Qwen, path: str | os.PathLike) -> Qwen:
    """`model` with the adapter at `path` merged into its weights (W + BA * alpha / r)."""
    merged = load_adapter(model, path).merge_and_unload()
    return merged.eval()
