"""Reward models (report §3.2.1): the Qwen backbone plus a scalar head, trained on preference pairs
with the pairwise loss -log sigmoid(r_chosen - r_rejected); the optimizer, schedule, distribution,
checkpoints and exact resume are the shared loop's (`qwenkit.train.loop`).

The score is read at the last token of the rendered conversation, the final answer's <|im_end|>
(ChatML without a trailing newline, `qwenkit.train.preference_data`). Checkpoints are written in
transformers' Qwen2ForSequenceClassification layout (`model.*` + `score.weight`, num_labels 1,
pad_token_id set), whose last-non-padding-token pooling lands on that same <|im_end|>: TRL and
OpenRLHF load qwenkit reward models with AutoModelForSequenceClassification and get the same scores.

Preference-model pretraining (PMP) and fine-tuning are two runs of this recipe, the second starting
from the first's checkpoint:

    qwenkit reward --config configs/reward/pmp.yaml --model ./Qwen-7B --data pmp.jsonl --out runs/pmp
    qwenkit reward --config configs/reward/rm.yaml --model runs/pmp --data hq.jsonl --out runs/rm
    qwenkit reward score --model runs/rm --data heldout.jsonl --out scores.jsonl
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwenkit.errors import QwenkitError
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer
from qwenkit.train import loop
from qwenkit.train.preference_data import PreferencePair, load_preference_pairs, pair_length
from qwenkit.train.settings import (
    CheckpointSection,
    EvalSection,
    LogSection,
    TrainSection,
    load_recipe,
    setting,
)

ARCHITECTURE = "Qwen2ForSequenceClassification"


class RewardModel(torch.nn.Module):
    """The Qwen network without its LM head, plus `score`, a linear map from the final hidden state
    to one number: input_ids [B, T] -> a score at every position [B, T] (PPO's values), or the
    score at each row's last token (`rewards`)."""

    def __init__(self, qwen: Qwen):
        super().__init__()
        self.qwen = qwen
        self.qwen.lm_head = None  # unused: neither stored nor trained
        self.score = torch.nn.Linear(
            qwen.config.hidden_size, 1, bias=False, device=qwen.device, dtype=qwen.dtype
        )
        if qwen.device.type != "meta":  # as transformers initializes it
            torch.nn.init.normal_(self.score.weight, std=qwen.config.initializer_range)

    @property
    def config(self):
        return self.qwen.config

    @property
    def model(self) -> torch.nn.Module:
        """The transformer (embeddings, blocks, norm), as named in the stored layout (FSDP wraps its blocks)."""
        return self.qwen.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, T] in float32; attention_mask (1 = token, 0 = padding) as Qwen's."""
        return self.score(self.qwen.hidden_states(input_ids, attention_mask)).squeeze(-1).float()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The score at each row's last non-padding token [B] (the final <|im_end|>)."""
        return self(input_ids, attention_mask).gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save_state(
        self, state: dict[str, torch.Tensor], tokenizer: Tokenizer | None, directory: Path
    ) -> None:
        """Write a full state dict (this module's names) in the Qwen2ForSequenceClassification layout."""
        from qwenkit.checkpoint import save_state_dict

        stored = {name.removeprefix("qwen."): tensor for name, tensor in state.items()}
        pad = tokenizer.pad_id if tokenizer is not None else None
        hf = {"architectures": [ARCHITECTURE], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
              "pad_token_id": pad, "tie_word_embeddings": False}  # fmt: skip
        save_state_dict(stored, self.config, None, tokenizer, directory, torch.float32, hf_config=hf)

    def state_from_checkpoint(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensor names -> this module's, checking that every tensor is there and nothing else."""
        state = {("qwen." + name if name.startswith("model.") else name): t for name, t in stored.items()}
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise QwenkitError(
                f"not a reward model checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last position holding a token (right or left padding), as transformers pools."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_chosen - r_rejected), averaged -> (loss, {"accuracy": share of pairs with
    r_chosen > r_rejected (ties count as wrong), "margin": mean r_chosen - r_rejected})."""
    difference = chosen.float() - rejected.float()
    loss = -F.logsigmoid(difference).mean()
    return loss, {"accuracy": (difference > 0).float().mean().detach(), "margin": difference.mean().detach()}


# --- loading and saving ------------------------------------------------------------------------------------


def resolve_run(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    from qwenkit.train.checkpointing import latest_checkpoint

    directory = Path(path)
    latest = latest_checkpoint(directory) if (directory / "checkpoints" / "latest").is_file() else None
    return latest or directory


def is_reward_checkpoint(path: str | os.PathLike) -> bool:
    from qwenkit.checkpoint import read_config_json

    return ARCHITECTURE in (read_config_json(resolve_run(path)).get("architectures") or [])


def load_reward_model(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype = "float32"
) -> tuple[RewardModel, Tokenizer]:
    """A reward model checkpoint (or a run directory: its latest) -> (model in eval mode, tokenizer)."""
    from qwenkit.checkpoint import config_from_hf, iter_tensors, read_config_json, resolve_dtype, weight_files
    from qwenkit.devices import pick_device

    directory = resolve_run(path)
    hf = read_config_json(directory)
    if ARCHITECTURE not in (hf.get("architectures") or []):
        raise QwenkitError(
            f"{directory} is not a reward model ({ARCHITECTURE}); train one with qwenkit reward"
        )
    labels = hf.get("num_labels", len(hf.get("id2label") or {"0": 0}))
    if labels != 1:
        raise QwenkitError(f"{directory} scores {labels} labels; a reward model has one")
    config, _ = config_from_hf(hf)
    target = pick_device("auto" if device is None else device)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = RewardModel(Qwen(config))
    state = model.state_from_checkpoint(dict(iter_tensors(weight_files(directory))))
    model.load_state_dict({k: v.to(device=target, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval(), Tokenizer.from_file(directory)


def save_reward_model(model: RewardModel, tokenizer: Tokenizer | None, directory: str | os.PathLike) -> Path:
    """Write `model` in the Qwen2ForSequenceClassification layout (transformers and qwenkit load it)."""
    model.save_state(model.state_dict(), tokenizer, Path(directory))
    return Path(directory)


def reward_model_from(path: str, device: torch.device) -> tuple[RewardModel, Tokenizer]:
    """The model a run starts from: a reward model as it is (fine-tuning after PMP), or a causal LM
    with a new score head (seeded by the run's seed)."""
    if is_reward_checkpoint(path):
        model, tokenizer = load_reward_model(path, device)
    else:
        from qwenkit.checkpoint import load

        qwen, tokenizer = load(resolve_run(path), device=device, dtype="float32")
        with torch.no_grad():  # the loader lays some CPU weights out for decoding; FSDP needs them contiguous
            for parameter in qwen.parameters():
                parameter.data = parameter.data.contiguous()
        model = RewardModel(qwen)
    return model.train(), tokenizer


# --- batches -----------------------------------------------------------------------------------------------


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs -> (ids [2B, T]: the chosen conversations then the rejected ones, right-padded; each
    row's last token index). Causal attention never looks right, so the padding changes no score."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(row) - 1 for row in rows])


def pair_rewards(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards [B], rejected rewards [B]) of a collated batch (through the wrapped model's forward)."""
    ids, last = batch
    rewards = model(ids).gather(1, last[:, None]).squeeze(1)
    return rewards.chunk(2)


def reward_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return pairwise_loss(*pair_rewards(model, batch))


@torch.no_grad()
def score_pairs(
    model: RewardModel, pairs: list[PreferencePair], pad_id: int, batch_size: int = 8, progress: bool = True
) -> list[tuple[float, float]]:
    """(chosen reward, rejected reward) of every pair, in order."""
    model.eval()
    scores = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="score", unit="batch", disable=not progress):
        batch = collate_pairs(pairs[start : start + batch_size], pad_id)
        chosen, rejected = pair_rewards(model, tuple(x.to(model.qwen.device) for x in batch))
        scores += zip(chosen.tolist(), rejected.tolist(), strict=True)
    return scores


# --- the recipe --------------------------------------------------------------------------------------------


@dataclass
class RewardModelSection:
    path: str = ""  # a causal LM (a new score head) or a reward model / its run directory (--model)


@dataclass
class RewardDataSection:
    path: str = ""  # preference pairs, JSONL in TRL's formats (--data)
    eval_path: str = ""  # held-out pairs (--eval-data); else data.val_fraction of data.path
    max_len: int = setting(2048, min=4)  # prompt + the longer answer, in tokens
    strict: bool = False  # fail on the first malformed row instead of skipping it
    val_fraction: float = setting(0.0, min=0, below=1)
    epochs: float | None = setting(None, above=0)  # set: train.max_steps = this many passes over the pairs


@dataclass
class RewardRecipe:
    model: RewardModelSection = field(default_factory=RewardModelSection)
    data: RewardDataSection = field(default_factory=RewardDataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


def load_pairs(
    path: str, tokenizer: Tokenizer, max_len: int, strict: bool, main: bool
) -> list[PreferencePair]:
    pairs, report = load_preference_pairs(path, tokenizer, max_len, strict)
    if main:
        print(
            f"reward data {path}: {report.ok} pairs, {report.skipped} skipped, {report.truncated} shortened"
        )
        for error in report.errors[:3]:
            print(f"  skipped {error}")
    if not pairs:
        raise QwenkitError(f"no usable preference pairs in {path}")
    return pairs


def run(recipe: RewardRecipe, out: Path) -> Path | None:
    d = recipe.data
    if not recipe.model.path:
        raise QwenkitError("no model to start from: pass --model DIR")
    if not d.path:  # before the model loads: it may be large
        raise QwenkitError("no training data: pass --data FILE")
    env = loop.start(recipe, out)
    model, tokenizer = reward_model_from(recipe.model.path, env.device)
    pairs = load_pairs(d.path, tokenizer, d.max_len, d.strict, env.main)
    if d.eval_path:
        train, held_out = pairs, load_pairs(d.eval_path, tokenizer, d.max_len, d.strict, env.main)
    else:
        held = round(len(pairs) * d.val_fraction)
        if held == len(pairs):
            raise QwenkitError(f"data.val_fraction {d.val_fraction} holds out all {held} pairs")
        train, held_out = pairs[held:], pairs[:held]
    if d.epochs is not None:
        global_batch = recipe.train.micro_batch_size * recipe.train.grad_accum * env.world_size
        recipe.train.max_steps = max(1, math.ceil(d.epochs * len(train) / global_batch))
    longest = max(map(pair_length, train))
    task = loop.Task("reward", model, tokenizer, train, held_out, lambda rows: collate_pairs(rows, tokenizer.pad_id),
                     longest, loss=reward_loss)  # fmt: skip
    final = loop.train(recipe, out, env, task)
    if final is not None:
        plot_accuracy(out / "metrics.jsonl", out / "accuracy.png", f"reward: {out.name}")
    return final


def plot_accuracy(metrics: Path, png: Path, title: str) -> None:
    """Pairwise accuracy on training and held-out pairs against step (beside the loop's loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("accuracy", "train", "-"), ("val_accuracy", "held-out", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("pairwise accuracy (r_chosen > r_rejected)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = load_recipe(RewardRecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        print(f"reward model done in {time.perf_counter() - started:.0f}s; model: {final}")
    return 0


def score_main(
    model_path: str, data: str, out: str | None, max_len: int, batch_size: int, device: str | None
) -> int:
    """`qwenkit reward score`: pairwise accuracy of a reward model on a preference file; per-pair
    scores as JSONL ({"line", "chosen", "rejected", "margin", "correct"}) into `out` (default: beside
    the data, DATA.scores.jsonl)."""
    target = Path(out) if out is not None else Path(data).with_suffix(".scores.jsonl")
    if target.resolve() == Path(data).resolve():  # before anything is read: it would overwrite the data
        raise QwenkitError(f"--out {target} is the data file itself; name another file for the scores")
    model, tokenizer = load_reward_model(model_path, device)
    pairs, report = load_preference_pairs(data, tokenizer, max_len)
    for error in report.errors[:3]:
        print(f"skipped {error}")
    if not pairs:
        raise QwenkitError(f"no usable preference pairs in {data}")
    scores = score_pairs(model, pairs, tokenizer.pad_id, batch_size)
    correct = [chosen > rejected for chosen, rejected in scores]
    margin = sum(c - r for c, r in scores) / len(scores)
    print(f"accuracy {sum(correct) / len(correct):.4f} on {len(scores)} pairs ({report.skipped} skipped), "
          f"mean margin {margin:.4f}")  # fmt: skip
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            for pair, (chosen, rejected), ok in zip(pairs, scores, correct, strict=True):
                record = {"line": pair.line, "chosen": chosen, "rejected": rejected, "margin": chosen - rejected,
                          "correct": ok}  # fmt: skip
                f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise QwenkitError(f"cannot write the scores to {target}: {e.strerror}") from None
    print(f"scores: {target}")
    return 0
