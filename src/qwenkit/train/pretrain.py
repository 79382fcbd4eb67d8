"""Pretraining (report §2.3): next-token prediction on packed windows, AdamW (0.9, 0.95, 1e-8),
linear warmup then cosine decay to 10% of the peak, gradient clipping at 1.0, bf16 autocast on
GPUs and fp32 on CPUs, one process or many under torchrun (DDP or FSDP2), exact resume.

    qwenkit pretrain --config configs/pretrain/tiny.yaml --out runs/tiny --train.max_steps 20
    torchrun --nproc_per_node 8 -m qwenkit pretrain --config configs/pretrain/qwen-7b.yaml --out runs/7b
"""

from __future__ import annotations

import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from qwenkit.config import QwenConfig
from qwenkit.errors import QwenkitError
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer
from qwenkit.train import common
from qwenkit.train.common import setting


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
            checked[key] = common.check_type(value, hints[key], name)
            if type(checked[key]) is int:
                common.check_setting(checked[key], {"min": 1}, name)
        self.overrides = checked
        QwenConfig.from_preset(self.preset, **self.overrides)


@dataclass
class DataSection:
    path: str = ""  # a directory written by `qwenkit data pack`
    synthetic_documents: int = setting(0, min=0)  # > 0 and `path` missing: pack the generated corpus
    seq_len: int = setting(128, min=1)  # window length when packing the generated corpus


@dataclass
class TrainSection:
    max_steps: int = setting(100, min=1)
    micro_batch_size: int = setting(8, min=1)  # windows per process per forward/backward
    grad_accum: int = setting(1, min=1)  # global batch = micro_batch_size * grad_accum * processes
    lr: float = setting(3e-4, above=0)
    warmup_steps: int = setting(10, min=0)
    final_lr_ratio: float = setting(0.1, min=0, max=1)
    decay: str = setting("cosine", choices=("cosine", "constant"))  # constant: the peak after warmup
    weight_decay: float = setting(0.1, min=0)
    beta1: float = setting(0.9, min=0, below=1)
    beta2: float = setting(0.95, min=0, below=1)
    eps: float = setting(1e-8, above=0)
    grad_clip: float = setting(1.0, above=0)
    seed: int = setting(0, min=0, below=2**63)
    device: str | None = None  # cpu, cuda or cuda:N (default: cuda when there is one)
    distributed: str = setting("ddp", choices=("ddp", "fsdp"))  # under torchrun
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class EvalSection:
    every: int = setting(0, min=0)  # steps between held-out evaluations (0 = only at the end)
    batches: int = setting(8, min=1)


@dataclass
class CheckpointSection:
    every: int = setting(0, min=0)  # steps between checkpoints (0 = only at the end)
    keep: int = setting(2, min=0)  # the newest checkpoints kept (0 = all)


@dataclass
class LogSection:
    every: int = setting(1, min=1)
    tensorboard: bool = False
    progress: bool = True


@dataclass
class PretrainRecipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


def prepare_data(recipe: PretrainRecipe, out: Path, env: common.Distributed):
    """(train dataset, val dataset or None, tokenizer) from the packed directory."""
    from qwenkit.data.pack import PackedDataset

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
    return model.train(), tokenizer


def windows_to_batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed windows [seq_len + 1] -> (inputs, labels) shifted by one token."""
    windows = torch.stack(rows)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model, dataset, recipe: PretrainRecipe, env: common.Distributed, autocast) -> float:
    """Mean next-token loss over the first `eval.batches` micro-batches of the held-out split
    (rounded up to a multiple of the process count: every process must run the same number of
    forward passes, which FSDP's collective weight gathering needs)."""
    model.eval()
    micro = recipe.train.micro_batch_size
    count = min(recipe.eval.batches, math.ceil(len(dataset) / micro))
    per_process = math.ceil(count / env.world_size)
    total = 0.0
    for k in range(per_process):
        b = k * env.world_size + env.rank
        inputs, labels = windows_to_batch(
            [dataset[i % len(dataset)] for i in range(b * micro, (b + 1) * micro)]
        )
        total += common.next_token_loss(model, inputs.to(env.device), labels.to(env.device), autocast).item()
    model.train()
    return env.mean(total / per_process)


def save_checkpoint(out: Path, step: int, model, optimizer, tokenizer, recipe, env) -> None:
    """All processes gather the full state; the main one writes it and moves it into place."""
    from qwenkit.checkpoint import save_state_dict

    model_state, optimizer_state = common.full_state(model, optimizer)
    if not env.main:
        return
    staging = common.staging_dir(out, step)
    raw = common.unwrap(model)
    save_state_dict(model_state, raw.config, None, tokenizer, staging, torch.float32)
    samples = step * recipe.train.micro_batch_size * recipe.train.grad_accum * env.world_size
    common.commit_trainer_state(out, staging, step, optimizer_state, recipe, samples_seen=samples)


def resume(out: Path, model, optimizer) -> int:
    """Restore the latest checkpoint (weights, optimizer, RNG); the step to continue from."""
    from qwenkit.checkpoint import iter_tensors, weight_files

    path = common.latest_checkpoint(out)
    if path is None:
        return 0
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    model_state = dict(iter_tensors(weight_files(path)))
    raw = common.unwrap(model)
    if raw.config.tie_word_embeddings:
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
    common.restore_state(model, optimizer, model_state, state["optimizer"])
    common.set_rng_state(state["rng"])
    return int(state["step"])


def run(recipe: PretrainRecipe, out: Path) -> Path:
    """Train; returns the directory of the last checkpoint (a model directory qwenkit and transformers load)."""
    env = common.setup_distributed(recipe.train.device)
    common.prepare_run_dir(out, env)
    torch.manual_seed(recipe.train.seed)
    train_data, val_data, tokenizer = prepare_data(recipe, out, env)
    model, tokenizer = build_model(recipe, tokenizer, env.device)
    model.activation_checkpointing = recipe.train.activation_checkpointing
    model.to(env.device)
    model = common.wrap_model(model, recipe.train.distributed, env)
    t = recipe.train
    optimizer = common.make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    start = resume(out, model, optimizer)
    if recipe.train.compile:
        model = torch.compile(model)
    if env.main:
        (out / "recipe.yaml").write_text(yaml.safe_dump(common.recipe_to_dict(recipe), sort_keys=False))
    batches = common.StepBatches(train_data, t.micro_batch_size, t.grad_accum, env, t.seed, windows_to_batch)
    flops = common.training_flops_per_token(model, train_data.seq_len)

    def held_out(model, autocast):
        return evaluate(model, val_data, recipe, env, autocast) if val_data is not None else None

    def save(step):
        save_checkpoint(out, step, model, optimizer, tokenizer, recipe, env)

    common.fit(model, optimizer, batches, recipe, out, env, start, save, held_out, flops, "pretrain")
    return common.finish(out, env)


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = common.load_recipe(PretrainRecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        print(f"pretraining done in {time.perf_counter() - started:.0f}s; model: {final}")
    return 0
