"""Pieces every training recipe shares: recipe configs with dotted overrides, AdamW with the
report's settings, the warmup + cosine schedule, torchrun distribution (DDP or FSDP2), atomic
checkpoints with the full trainer state, and metrics (JSONL, TensorBoard, a loss-curve PNG)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import os
import random
import re
import shutil
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from qwenkit.errors import QwenkitError

# --- configs -------------------------------------------------------------------------------------


def load_recipe(cls, path: str | os.PathLike | None, overrides: list[str]):
    """An instance of the dataclass `cls` from a YAML file plus `--section.key value` overrides."""
    values: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise QwenkitError(f"config file not found: {file}")
        try:
            values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise QwenkitError(f"{file} is not a YAML recipe (not UTF-8 text)") from None
        except OSError as e:
            raise QwenkitError(f"cannot read {file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise QwenkitError(f"{file} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise QwenkitError(f"{file} must hold a mapping of sections")
    if len(overrides) % 2:
        raise QwenkitError(f"override {overrides[-1]!r} has no value (use --section.key VALUE)")
    for flag, text in zip(overrides[::2], overrides[1::2], strict=True):
        if not flag.startswith("--") or "." not in flag:
            raise QwenkitError(f"unknown option {flag!r}; overrides look like --train.lr 3e-4")
        *sections, key = flag[2:].replace("-", "_").split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise QwenkitError(f"{flag}: {section} is not a section")
        try:
            target[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise QwenkitError(f"{flag}: {text!r} is not a YAML value") from None
    return build_dataclass(cls, values, "")


def setting(default, *, choices: tuple | None = None, **bounds):
    """A recipe field with its allowed values, checked when a recipe is loaded: `choices`, or
    bounds `min` (>=), `above` (>), `max` (<=), `below` (<). Every float setting must be finite."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    return field(default=default, metadata={"choices": choices, **bounds})


BOUNDS = {"min": (">=", operator.ge), "above": (">", operator.gt), "max": ("<=", operator.le),
          "below": ("<", operator.lt)}  # fmt: skip


def check_setting(value, metadata, name: str) -> None:
    if value is None:
        return
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise QwenkitError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    for key, (sign, holds) in BOUNDS.items():
        if key in metadata and not holds(value, metadata[key]):
            raise QwenkitError(f"{name} must be {sign} {metadata[key]}, got {value!r}")


def build_dataclass(cls, values: dict, where: str):
    """Recursively build dataclass `cls` from a dict, checking names, simple types and the
    allowed values each field declares (`setting`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(name) for name in set(values) - set(fields))
    if unknown:
        raise QwenkitError(f"unknown setting {where}{unknown[0]}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise QwenkitError(f"{where}{name} must be a section (a mapping)")
            kwargs[name] = build_dataclass(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = check_type(value, hint, f"{where}{name}")
            check_setting(kwargs[name], fields[name].metadata, f"{where}{name}")
    return cls(**kwargs)


def check_type(value, hint, name: str):
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads "3e-4" (no dot) as a string
                number = float(value)
            except (ValueError, OverflowError):
                continue
            if not math.isfinite(number):
                raise QwenkitError(f"{name} must be a finite number, got {value!r}")
            return number
        if option in (int, str, bool) and type(value) is option:
            return value
        container = typing.get_origin(option) or option
        if container in (list, dict) and isinstance(value, container):
            return value
        if option is typing.Any:
            return value
    raise QwenkitError(f"{name} has the wrong type: {value!r}")


def recipe_to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


# --- optimizer and schedule ----------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float) -> torch.optim.AdamW:  # fmt: skip
    """AdamW with weight decay on matrices (projections, embeddings) and none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def learning_rate(step: int, peak: float, warmup: int, total: int, final_ratio: float = 0.1,
                  decay: str = "cosine") -> float:  # fmt: skip
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `final_ratio * peak` at
    `total` (report §2.3); decay "constant" holds the peak after warmup (Code-Qwen's recipe).
    `step` counts from 0: step 0 trains with peak / warmup."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return peak
    progress = min((step - warmup) / (total - warmup), 1.0)
    floor = final_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- distribution --------------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of a float over all processes."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def setup_distributed(device: str | None) -> Distributed:
    """Read torchrun's environment; start the process group (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise QwenkitError(f"train.device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QwenkitError(f"train.device is {device} but no CUDA GPU is available")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, target)


def wrap_model(model: torch.nn.Module, strategy: str, env: Distributed) -> torch.nn.Module:
    """DDP (a full copy per process) or FSDP2 (`fully_shard` per block, then the whole model)."""
    if env.world_size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise QwenkitError(f"train.distributed must be ddp or fsdp, got {strategy!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# --- the run directory and its checkpoints -------------------------------------------------------

# What a checkpoint being written is called: save_checkpoint's staging folder, and the temporary
# folder qwenkit.checkpoint.save_state_dict writes that folder through (`.` + name + `.` + 8 random).
STAGING = re.compile(r"\.tmp-step-\d+|\.\.tmp-step-\d+\.[a-z0-9_]{8}")


def staging_dir(out: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is moved into place."""
    return out / "checkpoints" / f".tmp-step-{step:07d}"


def prepare_run_dir(out: Path, env: Distributed) -> None:
    """Create the run directory; the main process deletes the staging folders of checkpoints a
    killed run was writing (only those, only in OUT/checkpoints)."""
    if out.exists() and not out.is_dir():
        raise QwenkitError(f"the run directory {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QwenkitError(f"cannot create the run directory {out}: {e.strerror}") from None
    if env.main:
        remove_stale_staging(out)


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete OUT/checkpoints' unfinished checkpoints (named as STAGING); returns what was deleted."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    stale = sorted(
        p for p in root.iterdir() if STAGING.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )
    for path in stale:
        shutil.rmtree(path)
    return stale


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts, gathered on CPU, for any wrapping."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(
        model, optimizer, options=options
    )


def restore_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                  optimizer_state: dict) -> None:  # fmt: skip
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint named by out/checkpoints/latest (written last, atomically), if any."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise QwenkitError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def commit_trainer_state(out: Path, staging: Path, step: int, optimizer_state: dict, recipe, **extra) -> Path:
    """Write trainer_state.pt (step, optimizer, RNG, recipe, `extra`) into a checkpoint being
    written at `staging`, then move the checkpoint into place."""
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "rng": rng_state(),
        "recipe": recipe_to_dict(recipe),
        **extra,
    }
    torch.save(state, staging / "trainer_state.pt")
    return commit_checkpoint(out, staging, f"step-{step:07d}", recipe.checkpoint.keep)


def commit_checkpoint(out: Path, staging: Path, name: str, keep: int) -> Path:
    """Move a fully written checkpoint into place, then point `latest` at it; then delete the oldest
    others so that `keep` remain (0 keeps all). The new checkpoint itself is never deleted."""
    root = out / "checkpoints"
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    pointer = root / "latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    if keep > 0:
        others = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        for old in others[: max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --- metrics -------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl (one object per logged step), optional TensorBoard, and a loss-curve PNG."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.file = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.file.exists():  # drop what a killed run logged after its last checkpoint
            kept = [line for line in self.file.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            self.file.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QwenkitError(
                    "log.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def plot(self, png: Path, title: str) -> None:
        """Training (and validation) loss against step."""
        if not self.enabled or not self.file.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Tokens per second (and MFU on GPUs) over the last logging interval."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens / elapsed
        self.start, self.tokens = time.perf_counter(), 0
        result = {"tokens_per_sec": rate}
        if self.peak_flops:
            result["mfu"] = rate * self.flops_per_token / self.peak_flops
        return result


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6N for the matrices (forward + backward) plus attention scores: 12 * layers * hidden * T."""
    config = unwrap(model).config
    matrices = config.num_parameters - config.vocab_size * config.hidden_size  # the embedding is a lookup
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matrices + attention


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for MFU); None on CPU or unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for marker, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12)):
        if marker in name:
            return flops
    return None


# --- the loop ------------------------------------------------------------------------------------


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

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's `accum` micro-batches of global step `step`."""
        start = step * self.global_size
        batches = []
        for m in range(self.accum):
            first = start + (m * self.env.world_size + self.env.rank) * self.micro
            batches.append(self.collate([self.dataset[self.sample(first + i)] for i in range(self.micro)]))
        return batches


def next_token_loss(
    model, inputs: torch.Tensor, labels: torch.Tensor, autocast, segment_ids=None
) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (-100 = no loss), computed in fp32."""
    with autocast():
        logits = model(inputs) if segment_ids is None else model(inputs, segment_ids=segment_ids)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def gradient_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def fit(model, optimizer, batches: StepBatches, recipe, out: Path, env: Distributed, start: int, save,
        evaluate, flops_per_token: float, name: str) -> None:  # fmt: skip
    """The loop every recipe shares: schedule, accumulation, clipping, logging, held-out
    evaluation (`evaluate(model, autocast) -> loss or None`) and checkpoints (`save(step)`)."""
    t = recipe.train
    cuda = env.device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    metrics = Metrics(out, env.main, recipe.log.tensorboard, start)
    throughput = Throughput(flops_per_token, peak_bf16_flops(env.device))
    progress = tqdm(total=t.max_steps, initial=start, disable=not (env.main and recipe.log.progress),
                    desc=name, unit="step", dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    for step in range(start, t.max_steps):
        lr = learning_rate(step, t.lr, t.warmup_steps, t.max_steps, t.final_lr_ratio, t.decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = batches.micro_batches(step)
        losses = []
        for m, (inputs, labels, *segments) in enumerate(micro_batches):  # segments: packed rows
            segment_ids = segments[0].to(env.device) if segments else None
            with gradient_sync(model, m == len(micro_batches) - 1):
                loss = next_token_loss(
                    model, inputs.to(env.device), labels.to(env.device), autocast, segment_ids
                )
                (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            throughput.add(inputs.numel() * env.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % recipe.log.every == 0 or done == t.max_steps:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record = {"step": done, "loss": env.mean(torch.stack(losses).mean().item()), "lr": lr,
                      "grad_norm": float(norm)}  # fmt: skip
            record.update(throughput.read())
            if (recipe.eval.every and done % recipe.eval.every == 0) or done == t.max_steps:
                val_loss = evaluate(model, autocast)
                if val_loss is not None:
                    record["val_loss"] = val_loss
                    record["val_ppl"] = math.exp(min(val_loss, 50.0))
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
    metrics.plot(out / "loss.png", f"{name}: {out.name}")


def finish(out: Path, env: Distributed) -> Path | None:
    """End a run: wait for every process, close the process group; the last checkpoint (main process)."""
    final = latest_checkpoint(out) if env.main else None
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final
