"""Pretraining (report §2.3): next-token prediction on packed windows, AdamW (0.9, 0.95, 1e-8),
linear warmup then cosine decay to 10% of the peak, gradient clipping at 1.0, bf16 autocast on
GPUs and fp32 on CPUs, one process or many under torchrun (DDP or FSDP2), exact resume.

    qwenkit pretrain --config configs/pretrain/tiny.yaml --out runs/tiny --train.max_steps 20
    torchrun --nproc_per_node 8 -m qwenkit pretrain --config configs/pretrain/qwen-7b.yaml --out runs/7b
"""

from __future__ import annotations

import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenkit.config import QwenConfig
from qwenkit.errors import QwenkitError
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer
from qwenkit.train import loop
from qwenkit.train.distributed import Distributed
from qwenkit.train.settings import (
    CheckpointSection,
    EvalSection,
    LogSection,
    TrainSection,
    check_setting,
    check_type,
    load_recipe,
    setting,
)


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # any QwenConfig field, e.g. {num_hidden_layers: 4}
    init_from: str | None = None  # a checkpoint directory: continued pretraining

    def __post_init__(self) -> None:
        """Check the preset and overrides now, before any data is prepared; QwenConfig's integer
        fields are all sizes or counts, so they must be >= 1."""
        hints = typing.get_type_hints(QwenConfig)
        checked = {}
        for key, value in self.overrides.items():
            name = f"model.overrides.{key}"
            if key not in hints:
                raise QwenkitError(f"unknown setting {name}; QwenConfig has {', '.join(hints)}")
            checked[key] = check_type(value, hints[key], name)
            if type(checked[key]) is int:
                check_setting(checked[key], {"min": 1}, name)
        self.overrides = checked
        QwenConfig.from_preset(self.preset, **self.overrides)


@dataclass
class DataSection:
    path: str = ""  # a directory written by `qwenkit data pack`
    synthetic_documents: int = setting(0, min=0)  # > 0 and `path` missing: pack the generated corpus
    seq_len: int = setting(128, min=1)  # window length when packing the generated corpus


@dataclass
class PretrainRecipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


def prepare_data(recipe: PretrainRecipe, out: Path, env: Distributed):
    """(train dataset, val dataset or None, tokenizer) from the packed directory."""
    from qwenkit.data.packed import PackedDataset

    directory = Path(recipe.data.path) if recipe.data.path else out / "data"
    if not (directory / "index.json").is_file():
        if recipe.data.synthetic_documents <= 0:
            raise QwenkitError(
                f"no packed data at {directory}; run `qwenkit data pack` (or set data.synthetic_documents)"
            )
        if env.main:
            pack_synthetic(directory, recipe.data.synthetic_documents, recipe.data.seq_len, recipe.train.seed)
        if env.world_size > 1:
            torch.distributed.barrier()
    train = PackedDataset(directory, split="train")
    val = PackedDataset(directory, split="val") if (directory / "val.bin").is_file() else None
    index = json.loads((directory / "index.json").read_text())
    tokenizer = Tokenizer.from_file(index["tokenizer"])
    return train, val, tokenizer


def pack_synthetic(directory: Path, documents: int, seq_len: int, seed: int) -> None:
    """The generated corpus, packed with a byte-level vocabulary (256 ranks + the special tokens)."""
    from qwenkit.data.pack import Source, pack_documents
    from qwenkit.data.synthetic import write_corpus

    directory.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(directory / "corpus.jsonl", documents, seed)
    vocab = directory / "qwen.tiktoken"
    Tokenizer({bytes([b]): b for b in range(256)}).save(vocab)
    pack_documents([Source([corpus], 1.0)], Tokenizer.from_file(vocab), seq_len, directory, seed=seed,
                   val_fraction=0.02)  # fmt: skip


def build_model(recipe: PretrainRecipe, tokenizer: Tokenizer, device: torch.device) -> tuple[Qwen, Tokenizer]:
    if recipe.model.init_from:
        from qwenkit.checkpoint import load

        model, tokenizer = load(recipe.model.init_from, device=device, dtype="float32")
        return model.train(), tokenizer
    config = QwenConfig.from_preset(recipe.model.preset, **recipe.model.overrides)
    if config.vocab_size < tokenizer.vocab_size:
        raise QwenkitError(
            f"model vocab_size {config.vocab_size} < the tokenizer's {tokenizer.vocab_size} ids"
        )
    model = Qwen(config)
    model.init_weights(seed=recipe.train.seed)
    return model.to(device).train(), tokenizer


def windows_to_batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed windows [seq_len + 1] -> (inputs, labels) shifted by one token."""
    windows = torch.stack(rows)
    return windows[:, :-1], windows[:, 1:]


def run(recipe: PretrainRecipe, out: Path) -> Path | None:
    """Train; returns the directory of the last checkpoint (a model directory qwenkit and transformers
    load) on the main process."""
    env = loop.start(recipe, out)
    train_data, val_data, tokenizer = prepare_data(recipe, out, env)
    model, tokenizer = build_model(recipe, tokenizer, env.device)
    task = loop.Task("pretrain", model, tokenizer, train_data, val_data, windows_to_batch, train_data.seq_len)
    return loop.train(recipe, out, env, task)


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = load_recipe(PretrainRecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        print(f"pretraining done in {time.perf_counter() - started:.0f}s; model: {final}")
    return 0
