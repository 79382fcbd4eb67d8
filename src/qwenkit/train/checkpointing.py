"""The run directory and its checkpoints: each written beside its place and renamed, `latest`
pointed at it last, the oldest deleted past `checkpoint.keep`, what a killed run left half written
cleaned up; a checkpoint holds the weights (a model directory, or a LoRA adapter in peft's format)
and the trainer state (step, optimizer, RNG, recipe), so a resumed run repeats the same losses."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from qwenkit.errors import QwenkitError
from qwenkit.train.distributed import Distributed, unwrap
from qwenkit.train.settings import Recipe, recipe_to_dict

# What a checkpoint being written is called: its staging folder (staging_dir), and the temporary
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


def commit_trainer_state(out: Path, staging: Path, step: int, optimizer_state: dict, recipe: Recipe,
                         **extra) -> Path:  # fmt: skip
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


# --- the two kinds of checkpoint -----------------------------------------------------------------


def save_model(out: Path, step: int, model, optimizer, tokenizer, recipe: Recipe, env: Distributed,
               **extra) -> None:  # fmt: skip
    """A full checkpoint: a model directory (qwenkit, transformers and vLLM load it) plus the trainer
    state. All processes gather the full state; the main one writes it and moves it into place."""
    from qwenkit.checkpoint import save_state_dict

    model_state, optimizer_state = full_state(model, optimizer)
    if not env.main:
        return
    staging = staging_dir(out, step)
    network = unwrap(model)
    if hasattr(network, "save_state"):  # a model with a layout of its own (qwenkit.train.reward)
        network.save_state(model_state, tokenizer, staging)
    else:
        save_state_dict(model_state, network.config, None, tokenizer, staging, torch.float32)
    commit_trainer_state(out, staging, step, optimizer_state, recipe, **extra)


def resume_model(out: Path, model, optimizer) -> int:
    """Restore the latest full checkpoint (weights, optimizer, RNG); the step to continue from (0: none)."""
    from qwenkit.checkpoint import iter_tensors, weight_files

    path = latest_checkpoint(out)
    if path is None:
        return 0
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    model_state = dict(iter_tensors(weight_files(path)))
    network = unwrap(model)
    if hasattr(network, "state_from_checkpoint"):  # stored names -> the module's (qwenkit.train.reward)
        model_state = network.state_from_checkpoint(model_state)
    elif network.config.tie_word_embeddings:
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
    restore_state(model, optimizer, model_state, state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


def save_adapter(out: Path, step: int, model, optimizer, recipe: Recipe, env: Distributed, **extra) -> None:
    """A LoRA checkpoint: the adapter in peft's format plus the trainer state (which also holds the
    trainable weights, for resuming)."""
    _, optimizer_state = full_state(model, optimizer)
    if not env.main:
        return
    staging = staging_dir(out, step)
    staging.mkdir(parents=True, exist_ok=True)
    peft_model = unwrap(model)
    peft_model.save_pretrained(str(staging / "adapter"))
    trainable = {n: p.detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}
    commit_trainer_state(out, staging, step, optimizer_state, recipe, trainable=trainable, **extra)


def resume_adapter(out: Path, model, optimizer) -> int:
    """Restore the latest LoRA checkpoint (trainable weights, optimizer, RNG); the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = latest_checkpoint(out)
    if path is None:
        return 0
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["trainable"], strict=False)
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    set_rng_state(state["rng"])
    return int(state["step"])
