"""Supervised fine-tuning on ChatML conversations (report §3.1): the loss is taken on assistant
turns only (`qwenkit.train.sft_data`), full fine-tuning or LoRA through peft; the optimizer,
schedule, distribution, checkpoints and exact resume are the shared loop's (`qwenkit.train.loop`).

    qwenkit sft --config configs/sft/qwen-chat.yaml --model ./Qwen-7B --data chat.jsonl --out runs/sft
    qwenkit sft --config configs/sft/qwen-chat.yaml --model ./Qwen-7B --data chat.jsonl --out runs/lora --method lora
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenkit.errors import QwenkitError
from qwenkit.train import loop
from qwenkit.train.distributed import Distributed
from qwenkit.train.settings import (
    CheckpointSection,
    EvalSection,
    LogSection,
    TrainSection,
    load_recipe,
    setting,
)
from qwenkit.train.sft_data import IGNORE_INDEX, MASK_MODES, load_sft_samples


@dataclass
class SFTModelSection:
    path: str = ""  # the checkpoint to fine-tune (--model)
    method: str = setting("full", choices=("full", "lora", "qlora"))  # qlora: LoRA over a 4-bit NF4 base
    lora_r: int = setting(64, min=1)
    lora_alpha: int = setting(16, min=1)
    lora_dropout: float = setting(0.05, min=0, below=1)
    train_embeddings: bool | None = None  # LoRA: also train embedding and head; default: for base models


@dataclass
class SFTDataSection:
    path: str = ""  # official JSON (conversations) or OpenAI-style JSONL (messages) (--data)
    max_len: int = setting(512, min=2)
    packing: bool = False  # several conversations per sequence (block-diagonal attention)
    mask: str = setting("qwenkit", choices=MASK_MODES)  # "official": the original finetune.py's labels
    strict: bool = False  # fail on the first malformed sample instead of skipping it
    val_fraction: float = setting(0.0, min=0, below=1)


@dataclass
class SFTRecipe:
    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


def pad_conversations(samples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a micro-batch of conversations -> (inputs, next-token labels); padding is never learned."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        labels[row, : len(sample.labels)] = torch.tensor(sample.labels)
    return ids[:, :-1], labels[:, 1:]


def pack_conversations(samples, pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several conversations per row (first fit, longest first, rows of at most `max_len` tokens)
    -> (inputs, labels, segment_ids): attention stays inside each conversation and positions
    restart, so the loss equals the padded batch's with far fewer pad tokens."""
    rows: list[list] = []
    for sample in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        row = next(
            (r for r in rows if sum(len(s.input_ids) for s in r) + len(sample.input_ids) <= max_len), None
        )
        if row is None:
            rows.append([sample])
        else:
            row.append(sample)
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # padding is a segment of its own
    for r, row in enumerate(rows):
        start = 0
        for k, sample in enumerate(row):
            end = start + len(sample.input_ids)
            ids[r, start:end] = torch.tensor(sample.input_ids)
            labels[r, start:end] = torch.tensor(sample.labels)
            segments[r, start:end] = k
            start = end
    return ids[:, :-1], labels[:, 1:], segments[:, :-1]


def prepare_model(recipe: SFTRecipe, env: Distributed):
    from qwenkit.checkpoint import load

    if not recipe.model.path:
        raise QwenkitError("no model to fine-tune: pass --model DIR")
    model, tokenizer = load(recipe.model.path, device=env.device, dtype="float32")
    model.train()
    if recipe.model.method == "qlora":  # LoRA over a 4-bit NF4 base: nothing else changes
        from qwenkit.lora import quantize_nf4

        model = quantize_nf4(model, torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    if recipe.model.method in ("lora", "qlora"):
        from qwenkit.lora import add_lora

        base = model.generation_config is not None and model.generation_config.chat_format == "raw"
        train_embeddings = base if recipe.model.train_embeddings is None else recipe.model.train_embeddings
        m = recipe.model
        model = add_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout, train_embeddings)
    elif recipe.model.method != "full":
        raise QwenkitError(f"model.method must be full, lora or qlora, got {recipe.model.method!r}")
    return model, tokenizer


def run(recipe: SFTRecipe, out: Path) -> Path | None:
    if recipe.data.mask not in MASK_MODES:
        raise QwenkitError(f"data.mask must be one of {', '.join(MASK_MODES)}, got {recipe.data.mask!r}")
    d = recipe.data
    if not d.path:  # before the model loads: it may be large
        raise QwenkitError("no training data: pass --data FILE")
    env = loop.start(recipe, out)
    model, tokenizer = prepare_model(recipe, env)
    samples, report = load_sft_samples(d.path, tokenizer, d.max_len, d.mask, d.strict)
    if env.main:
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        print(f"sft model: {recipe.model.method}, {weights / 2**20:.1f} MB of weights")
        print(f"sft data: {report.ok} samples, {report.skipped} skipped, {report.truncated} truncated")
        for error in report.errors[:3]:
            print(f"  skipped {error}")
    if not samples:
        raise QwenkitError(f"no usable samples in {d.path}")
    held = round(len(samples) * d.val_fraction)
    if held == len(samples):
        raise QwenkitError(f"data.val_fraction {d.val_fraction} holds out all {held} samples")

    def collate(rows):
        if d.packing:
            return pack_conversations(rows, tokenizer.pad_id, d.max_len)
        return pad_conversations(rows, tokenizer.pad_id)

    train, val = samples[held:], samples[:held]
    lora = recipe.model.method in ("lora", "qlora")
    task = loop.Task("sft", model, tokenizer, train, val, collate, d.max_len, adapter=lora)
    return loop.train(recipe, out, env, task)


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = load_recipe(SFTRecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        what = f"model: {final}" if recipe.model.method == "full" else f"adapter: {final / 'adapter'}"
        print(f"fine-tuning done in {time.perf_counter() - started:.0f}s; {what}")
    return 0
