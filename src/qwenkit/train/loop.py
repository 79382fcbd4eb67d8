"""The training loop every recipe shares, and the one setup around it.

A recipe builds its data and model and hands them over as a `Task` (model, samples and how to batch
them, held-out samples, a loss); the loop does the rest the same way for every recipe: distribution,
activation checkpointing, the optimizer, exact resume, `torch.compile`, the steps (schedule, gradient
accumulation, clipping), held-out evaluation shared between the processes, logging and checkpoints.

    env = loop.start(recipe, out)                    # processes, run directory, seed
    model, tokenizer, samples, held_out = ...        # the recipe's own part (model on env.device)
    task = loop.Task("sft", model, tokenizer, samples, held_out, collate, seq_len)
    return loop.train(recipe, out, env, task)        # the last checkpoint
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer
from qwenkit.train.checkpointing import (
    latest_checkpoint,
    prepare_run_dir,
    resume_adapter,
    resume_model,
    save_adapter,
    save_model,
)
from qwenkit.train.distributed import Distributed, setup_distributed, wrap_model
from qwenkit.train.metrics import Metrics, Throughput, peak_bf16_flops, training_flops_per_token
from qwenkit.train.optimizer import learning_rate, make_optimizer
from qwenkit.train.settings import Recipe, recipe_to_dict

Batch = tuple[torch.Tensor, ...]


def next_token_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (-100 = no loss), computed in fp32. A batch is
    (inputs, labels) or, for packed rows, (inputs, labels, segment_ids)."""
    inputs, labels, *segments = batch
    logits = model(inputs, segment_ids=segments[0]) if segments else model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


@dataclass
class Task:
    """What a recipe hands the loop."""

    name: str  # "pretrain", "sft": shown on the progress bar and the loss plot
    model: torch.nn.Module  # on the process's device, in training mode, not wrapped for distribution
    tokenizer: Tokenizer  # written into full checkpoints
    samples: Sequence  # training samples
    held_out: Sequence | None  # held-out samples; None or empty: no evaluation
    collate: Callable[[list], Batch]  # samples -> a micro-batch whose first tensor is the input ids
    seq_len: int  # the longest sample in tokens (for FLOPs per token)
    # model, batch on the device -> the loss, or (loss, {name: scalar tensor}) for metrics logged beside
    # it (a reward model's accuracy and margin), averaged like the loss, held-out ones as val_<name>
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor | tuple[torch.Tensor, dict]] = next_token_loss
    adapter: bool = False  # a LoRA model: checkpoints hold the adapter (peft's format), not the whole model


def start(recipe: Recipe, out: Path) -> Distributed:
    """Begin a run, before the recipe builds its data and model: the processes, the run directory
    (without what a killed run left half written), the seed."""
    env = setup_distributed(recipe.train.device)
    prepare_run_dir(out, env)
    torch.manual_seed(recipe.train.seed)
    return env


def train(recipe: Recipe, out: Path, env: Distributed, task: Task) -> Path | None:
    """Train `task` as `recipe` says, continuing from OUT's latest checkpoint if there is one; returns
    the last checkpoint (on the main process; None on the others)."""
    t = recipe.train
    for module in task.model.modules():  # the network itself, also under peft's wrapper
        if isinstance(module, Qwen):
            module.activation_checkpointing = t.activation_checkpointing
    model = wrap_model(task.model, t.distributed, env)
    optimizer = make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    first_step = (resume_adapter if task.adapter else resume_model)(out, model, optimizer)
    forward = torch.compile(model) if t.compile else model  # checkpoints are written from `model`
    if env.main:
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    batches = StepBatches(task.samples, t.micro_batch_size, t.grad_accum, env, t.seed, task.collate)

    def save(step: int) -> None:
        seen = step * batches.global_size
        if task.adapter:
            save_adapter(out, step, model, optimizer, recipe, env, samples_seen=seen)
        else:
            save_model(out, step, model, optimizer, task.tokenizer, recipe, env, samples_seen=seen)

    fit(forward, optimizer, batches, task, recipe, out, env, first_step, save)
    final = latest_checkpoint(out) if env.main else None
    env.close()
    return final


class StepBatches:
    """The global batch of every step, from a fresh seeded permutation per epoch, so the data
    position is a function of the step alone (what makes resuming exact) and a global batch is the
    same whether one process accumulates it or several share it. `collate` turns a micro-batch's
    samples into (inputs, labels) or, for packed rows, (inputs, labels, segment_ids)."""

    def __init__(self, dataset, micro: int, accum: int, env: Distributed, seed: int, collate):
        self.dataset, self.micro, self.accum, self.env, self.seed = dataset, micro, accum, env, seed
        self.collate = collate
        self.global_size = micro * accum * env.world_size
        self.orders: dict[int, torch.Tensor] = {}

    def sample(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self.orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self.orders = {epoch: torch.randperm(len(self.dataset), generator=generator)}
        return int(self.orders[epoch][offset])

    def micro_batches(self, step: int) -> list[Batch]:
        """This process's `accum` micro-batches of global step `step`."""
        start = step * self.global_size
        batches = []
        for m in range(self.accum):
            first = start + (m * self.env.world_size + self.env.rank) * self.micro
            batches.append(self.collate([self.dataset[self.sample(first + i)] for i in range(self.micro)]))
        return batches


def split_loss(result) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A task's loss result -> (loss, extra metrics)."""
    return result if isinstance(result, tuple) else (result, {})


def autocast(device: torch.device):
    """bf16 autocast on GPUs; fp32 on CPUs."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def gradient_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, task: Task, micro: int, max_batches: int, env: Distributed) -> dict[str, float] | None:
    """Mean loss (and the task's extra metrics) of the first `max_batches` micro-batches of the
    held-out samples (None without any), each process computing its share (`env.share`). Every
    process runs as many forward passes as the longest share, since FSDP gathers weights
    collectively; a pass past a process's share repeats one of its batches (or batch 0) and is not
    counted."""
    if not task.held_out:
        return None
    size = len(task.held_out)
    count = min(max_batches, math.ceil(size / micro))
    share = env.share(count)
    model.eval()
    totals: dict[str, float] = {}
    for k in range(math.ceil(count / env.world_size)):
        b = share[min(k, len(share) - 1)] if share else 0
        batch = task.collate([task.held_out[i] for i in range(b * micro, min((b + 1) * micro, size))])
        with autocast(env.device):
            loss, extra = split_loss(task.loss(model, tuple(x.to(env.device) for x in batch)))
        for name, value in {"loss": loss, **extra}.items():
            totals[name] = totals.get(name, 0.0) + (float(value) if k < len(share) else 0.0)
    model.train()
    means = {}
    for name, total in totals.items():
        total, evaluated = env.sum(total, len(share))
        means[name] = total / evaluated
    return means


def fit(model, optimizer, batches: StepBatches, task: Task, recipe: Recipe, out: Path, env: Distributed,
        first_step: int, save: Callable[[int], None]) -> None:  # fmt: skip
    """The steps: schedule, accumulation, clipping, logging, held-out evaluation and checkpoints."""
    t = recipe.train
    metrics = Metrics(out, env.main, recipe.log.tensorboard, first_step)
    throughput = Throughput(training_flops_per_token(model, task.seq_len), peak_bf16_flops(env.device))
    progress = tqdm(total=t.max_steps, initial=first_step, disable=not (env.main and recipe.log.progress),
                    desc=task.name, unit="step", dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    for step in range(first_step, t.max_steps):
        lr = learning_rate(step, t.lr, t.warmup_steps, t.max_steps, t.final_lr_ratio, t.decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = batches.micro_batches(step)
        losses, extras = [], {}
        for m, batch in enumerate(micro_batches):
            batch = tuple(x.to(env.device) for x in batch)
            with gradient_sync(model, m == len(micro_batches) - 1):
                with autocast(env.device):
                    loss, extra = split_loss(task.loss(model, batch))
                (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            for name, value in extra.items():
                extras.setdefault(name, []).append(float(value))
            throughput.add(batch[0].numel() * env.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % recipe.log.every == 0 or done == t.max_steps:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record = {"step": done, "loss": env.mean(torch.stack(losses).mean().item()), "lr": lr,
                      "grad_norm": float(norm)}  # fmt: skip
            record.update({name: env.mean(sum(values) / len(values)) for name, values in extras.items()})
            record.update(throughput.read())
            if (recipe.eval.every and done % recipe.eval.every == 0) or done == t.max_steps:
                held_out = evaluate(model, task, t.micro_batch_size, recipe.eval.batches, env)
                if held_out is not None:
                    record.update({f"val_{name}": value for name, value in held_out.items()})
                    if not extras and not set(held_out) - {"loss"}:  # a language-model loss
                        record["val_ppl"] = math.exp(min(held_out["loss"], 50.0))
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
            save(done)
    progress.close()
    metrics.plot(out / "loss.png", f"{task.name}: {out.name}")
