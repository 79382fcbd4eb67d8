"""Recipe settings: the sections every recipe shares (train, eval, checkpoint, log), `setting(...)`
fields that declare their allowed values, and loading a recipe from YAML plus `--section.key VALUE`
overrides, checked before anything runs."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from qwenkit.yaml_settings import (  # noqa: F401  (re-exported: recipes import them from here)
    BOUNDS,
    build_dataclass,
    check_setting,
    check_type,
    load_recipe,
    setting,
)


def recipe_to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


# --- the sections every recipe shares ---------------------------------------------------------


@dataclass
class TrainSection:
    max_steps: int = setting(100, min=1)
    micro_batch_size: int = setting(8, min=1)  # samples (windows, conversations) per process per forward
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
    device: str | None = None  # cpu, cuda, cuda:N or auto (default: cuda when there is one)
    distributed: str = setting("ddp", choices=("ddp", "fsdp"))  # under torchrun
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class EvalSection:
    every: int = setting(0, min=0)  # steps between held-out evaluations (0 = only at the end)
    batches: int = setting(8, min=1)  # held-out micro-batches per evaluation, shared by the processes


@dataclass
class CheckpointSection:
    every: int = setting(0, min=0)  # steps between checkpoints (0 = only at the end)
    keep: int = setting(2, min=0)  # the newest checkpoints kept (0 = all)


@dataclass
class LogSection:
    every: int = setting(1, min=1)
    tensorboard: bool = False
    progress: bool = True


class Recipe(typing.Protocol):
    """What the training loop reads of a recipe; each recipe adds its own `model` and `data` sections."""

    train: TrainSection
    eval: EvalSection
    checkpoint: CheckpointSection
    log: LogSection
