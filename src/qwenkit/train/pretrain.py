"""Pretraining (report §2.3): next-token prediction on packed windows, AdamW (0.9, 0.95, 1e-8),
linear warmup then cosine decay to 10% of the peak, gradient clipping at 1.0, bf16 autocast on
GPUs and fp32 on CPUs, one process or many under torchrun (DDP or FSDP2), exact resume.

    qwenkit pretrain --config configs/pretrain/tiny.yaml --out runs/tiny --train.max_steps 20
    torchrun --nproc_per_node 8 -m qwenkit pretrain --config configs/pretrain/qwen-7b.yaml --out runs/7b
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from qwenkit.config import QwenConfig
from qwenkit.errors import QwenkitError
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer
from qwenkit.train import common


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # any QwenConfig field, e.g. {num_hidden_layers: 4}
    init_from: str | None = None  # a checkpoint directory: continued pretraining


@dataclass
class DataSection:
    path: str = ""  # a directory written by `qwenkit data pack`
    synthetic_documents: int = 0  # > 0 and `path` missing: pack the generated corpus (tiny recipes)
    seq_len: int = 128  # window length when packing the generated corpus


@dataclass
class TrainSection:
    max_steps: int = 100
    micro_batch_size: int = 8  # windows per process per forward/backward
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * processes
    lr: float = 3e-4
    warmup_steps: int = 10
    final_lr_ratio: float = 0.1
    decay: str = "cosine"  # or "constant" (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    device: str | None = None  # default: cuda when there is one
    distributed: str = "ddp"  # ddp or fsdp (under torchrun)
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class EvalSection:
    every: int = 0  # steps between held-out evaluations (0 = only at the end, if there is a val split)
    batches: int = 8


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints (0 = only at the end)
    keep: int = 2


@dataclass
class LogSection:
    every: int = 1
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


class Batches:
    """The global batch of every step, from a fresh seeded permutation per epoch, so the data
    position is a function of the step alone (what makes resuming exact) and a global batch is the
    same whether one process accumulates it or several share it."""

    def __init__(self, dataset, micro: int, accum: int, env: common.Distributed, seed: int):
        self.dataset, self.micro, self.accum, self.env, self.seed = dataset, micro, accum, env, seed
        self.global_size = micro * accum * env.world_size
        self.orders: dict[int, torch.Tensor] = {}

    def sample(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self.orders:
            self.orders = {
                epoch: torch.randperm(
                    len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)
                )
            }
        return int(self.orders[epoch][offset])

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This process's `accum` micro-batches [micro, seq_len + 1] of global step `step`."""
        start = step * self.global_size
        batches = []
        for m in range(self.accum):
            first = start + (m * self.env.world_size + self.env.rank) * self.micro
            batches.append(torch.stack([self.dataset[self.sample(first + i)] for i in range(self.micro)]))
        return batches


def next_token_loss(model, windows: torch.Tensor, autocast) -> torch.Tensor:
    inputs, labels = windows[:, :-1], windows[:, 1:]
    with autocast():
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


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
        rows = [dataset[i % len(dataset)] for i in range(b * micro, (b + 1) * micro)]
        total += next_token_loss(model, torch.stack(rows).to(env.device), autocast).item()
    model.train()
    return env.mean(total / per_process)


def gradient_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def save_checkpoint(out: Path, step: int, model, optimizer, tokenizer, recipe, env) -> None:
    """All processes gather the full state; the main one writes it and moves it into place."""
    from qwenkit.checkpoint import save_state_dict

    model_state, optimizer_state = common.full_state(model, optimizer)
    if not env.main:
        return
    name = f"step-{step:07d}"
    staging = out / "checkpoints" / f".tmp-{name}"
    raw = common.unwrap(model)
    save_state_dict(model_state, raw.config, None, tokenizer, staging, torch.float32)
    state = {"step": step, "optimizer": optimizer_state, "rng": common.rng_state(),
             "samples_seen": step * recipe.train.micro_batch_size * recipe.train.grad_accum * env.world_size,
             "recipe": common.recipe_to_dict(recipe)}  # fmt: skip
    torch.save(state, staging / "trainer_state.pt")
    common.commit_checkpoint(out, staging, name, recipe.checkpoint.keep)


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
    out.mkdir(parents=True, exist_ok=True)
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
    cuda = env.device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    batches = Batches(train_data, t.micro_batch_size, t.grad_accum, env, t.seed)
    metrics = common.Metrics(out, env.main, recipe.log.tensorboard, start)
    seq_len = train_data.seq_len
    throughput = common.Throughput(
        common.training_flops_per_token(model, seq_len), common.peak_bf16_flops(env.device)
    )
    progress = tqdm(total=t.max_steps, initial=start, disable=not (env.main and recipe.log.progress),
                    desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    for step in range(start, t.max_steps):
        lr = common.learning_rate(step, t.lr, t.warmup_steps, t.max_steps, t.final_lr_ratio, t.decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = batches.micro_batches(step)
        losses = []
        for m, windows in enumerate(micro_batches):
            with gradient_sync(model, m == len(micro_batches) - 1):
                loss = next_token_loss(model, windows.to(env.device, non_blocking=True), autocast)
                (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        throughput.add(len(micro_batches) * t.micro_batch_size * seq_len * env.world_size)
        done = step + 1
        if done % recipe.log.every == 0 or done == t.max_steps:
            record = {"step": done, "loss": env.mean(torch.stack(losses).mean().item()), "lr": lr,
                      "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)}  # fmt: skip
            record.update(throughput.read())
            if val_data is not None and (
                (recipe.eval.every and done % recipe.eval.every == 0) or done == t.max_steps
            ):
                record["val_loss"] = evaluate(model, val_data, recipe, env, autocast)
                record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
            metrics.log(record)
            shown = {
                "loss": f"{record['loss']:.4f}",
                "lr": f"{lr:.2e}",
                "tok/s": f"{record['tokens_per_sec']:.0f}",
            }
            if "mfu" in record:
                shown["mfu"] = f"{record['mfu']:.1%}"
            progress.set_postfix(shown)
        progress.update(1)
        if (recipe.checkpoint.every and done % recipe.checkpoint.every == 0) or done == t.max_steps:
            save_checkpoint(out, done, model, optimizer, tokenizer, recipe, env)
    progress.close()
    metrics.plot(out / "loss.png", f"pretraining: {out.name}")
    final = common.latest_checkpoint(out) if env.main else None
    if env.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = common.load_recipe(PretrainRecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        print(f"pretraining done in {time.perf_counter() - started:.0f}s; model: {final}")
    return 0
