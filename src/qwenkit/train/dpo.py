"""Direct preference optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"): fine-tune a chat model on preference pairs without a reward model or
sampling. Each pair is a prompt, a chosen and a rejected continuation (qwenkit.train.preference_data, TRL's
formats); with log-ratios against a frozen reference model

    d = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]

(log-probabilities summed over the learned tokens of each continuation), the loss is -log sigmoid(beta d)
("sigmoid"; with label smoothing eps, conservative DPO: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)),
IPO's (d / tokens - 1 / (2 beta))^2 with per-token averages as TRL computes it, or the hinge max(0, 1 - beta d).

The reference is the model as loaded, before any step: its log-probabilities are computed once, before
training, for every pair (`dpo.precompute_reference`, the default: one forward pass per pair in all), or
at every step from a frozen copy (full fine-tuning) or the same weights with the LoRA adapter switched
off (`--method lora`: no second copy). The optimizer, schedule, distribution, checkpoints and exact
resume are the shared loop's (`qwenkit.train.loop`).

    qwenkit dpo --config configs/dpo/qwen-chat.yaml --model runs/sft/checkpoints/latest --data pairs.jsonl --out runs/dpo
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenkit.errors import QwenkitError
from qwenkit.train import loop
from qwenkit.train.distributed import Distributed, unwrap
from qwenkit.train.settings import (
    CheckpointSection,
    EvalSection,
    LogSection,
    TrainSection,
    load_recipe,
    setting,
)

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOModelSection:
    path: str = ""  # the chat model to align, usually an SFT checkpoint (--model); also the reference
    method: str = setting("full", choices=("full", "lora"))
    lora_r: int = setting(64, min=1)
    lora_alpha: int = setting(16, min=1)
    lora_dropout: float = setting(0.0, min=0, below=1)  # 0: the policy's log-probs are those it samples with


@dataclass
class DPODataSection:
    path: str = ""  # preference pairs, JSONL in TRL's formats (--data)
    eval_path: str = ""  # held-out pairs (--eval-data); else val_fraction of --data
    max_len: int = setting(1024, min=2)  # prompt + continuation, in tokens
    strict: bool = False  # fail on the first malformed row instead of skipping it
    val_fraction: float = setting(0.0, min=0, below=1)


@dataclass
class DPOSection:
    beta: float = setting(0.1, above=0)  # strength of the implicit KL constraint (higher: stay closer)
    loss: str = setting("sigmoid", choices=LOSS_TYPES)
    label_smoothing: float = setting(0.0, min=0, below=0.5)  # sigmoid loss: the chance a label is flipped
    precompute_reference: bool = True  # reference log-probs once before training, not every step


@dataclass
class DPORecipe:
    model: DPOModelSection = field(default_factory=DPOModelSection)
    data: DPODataSection = field(default_factory=DPODataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss of a batch of pairs from the sequence log-probabilities [B] of the policy and the
    reference, and the metrics TRL logs: the implicit rewards beta * log-ratio of the chosen and rejected
    continuations, the share of pairs whose chosen reward is the higher (`accuracy`) and the mean margin.
    IPO needs the learned-token counts of each continuation."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise QwenkitError("the ipo loss needs the token counts of the continuations")
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise QwenkitError(f"dpo.loss must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return losses.mean(), metrics


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of the learned targets (-100: not learned), in fp32, and how
    many there are."""
    learned = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * learned).sum(-1), learned.sum(-1)


@dataclass
class DPOSample:
    """A pair as the loop sees it: its rows and, when precomputed, the reference log-probabilities."""

    chosen_ids: list[int]  # prompt + chosen
    chosen_labels: list[int]  # -100 over the prompt and unlearned turns
    rejected_ids: list[int]
    rejected_labels: list[int]
    reference: tuple[float, float] | None = None  # (chosen, rejected) sequence log-probs


def make_sample(pair) -> DPOSample:
    """A PreferencePair -> the chosen and rejected rows with their labels."""
    masked = [IGNORE_INDEX] * len(pair.prompt)
    return DPOSample(pair.prompt + pair.chosen, masked + pair.chosen_labels,
                     pair.prompt + pair.rejected, masked + pair.rejected_labels)  # fmt: skip


def collate_pairs(samples: list[DPOSample], pad_id: int) -> tuple[torch.Tensor, ...]:
    """A micro-batch of pairs -> (inputs [2B, T], next-token targets [2B, T]) with the chosen rows first,
    then the rejected ones (right padding, never learned), plus the reference log-probs [2B] when known."""
    rows = [s.chosen_ids for s in samples] + [s.rejected_ids for s in samples]
    labels = [s.chosen_labels for s in samples] + [s.rejected_labels for s in samples]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[r, : len(row)] = torch.tensor(row)
        targets[r, : len(label)] = torch.tensor(label)
    batch = (ids[:, :-1], targets[:, 1:])
    if samples[0].reference is not None:
        reference = [s.reference[0] for s in samples] + [s.reference[1] for s in samples]
        batch += (torch.tensor(reference, dtype=torch.float32),)
    return batch


def reference_context(model: torch.nn.Module):
    """Run `model` as the reference: a peft model with its adapter switched off, else as it is."""
    import contextlib

    inner = unwrap(model)
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def precompute_reference(model: torch.nn.Module, samples: list[DPOSample], micro: int, pad_id: int,
                         env: Distributed) -> None:  # fmt: skip
    """Fill each sample's reference log-probs with the model as it is now (adapter off), the processes
    sharing the micro-batches and then the results, so every process ends with the same numbers."""
    was_training = model.training
    model.eval()
    count = -(-len(samples) // micro)
    values = [0.0] * (2 * len(samples))
    with reference_context(model):
        for b in env.share(count):
            part = samples[b * micro : (b + 1) * micro]
            ids, targets = collate_pairs(part, pad_id)[:2]
            with loop.autocast(env.device):
                logits = model(ids.to(env.device))
            logps = sequence_logps(logits, targets.to(env.device))[0].tolist()
            for k in range(len(part)):
                values[2 * (b * micro + k)] = logps[k]
                values[2 * (b * micro + k) + 1] = logps[len(part) + k]
    values = env.sum(*values)
    for k, sample in enumerate(samples):
        sample.reference = (values[2 * k], values[2 * k + 1])
    model.train(was_training)


def make_loss(recipe: DPORecipe, frozen: torch.nn.Module | None):
    """The loop's loss over a (chosen rows, rejected rows) micro-batch; the reference log-probs come with
    the batch, from `frozen` (a copy of the initial model) or from the model with its adapter off."""
    d = recipe.dpo

    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
        ids, targets, *known = batch
        logps, tokens = sequence_logps(model(ids), targets)
        if known:
            reference = known[0]
        else:
            with torch.no_grad(), reference_context(model):
                reference = sequence_logps((model if frozen is None else frozen)(ids), targets)[0]
        half = ids.shape[0] // 2
        return dpo_loss(logps[:half], logps[half:], reference[:half], reference[half:], d.beta, d.loss,
                        d.label_smoothing, tokens[:half], tokens[half:])  # fmt: skip

    return loss


def prepare_model(recipe: DPORecipe, env: Distributed):
    from qwenkit.checkpoint import load

    if not recipe.model.path:
        raise QwenkitError("no model to align: pass --model DIR")
    model, tokenizer = load(recipe.model.path, device=env.device, dtype="float32")
    model.train()
    if recipe.model.method == "lora":
        from qwenkit.lora import add_lora

        m = recipe.model
        model = add_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout)
    return model, tokenizer


def load_pairs(path: str, tokenizer, recipe: DPORecipe, env: Distributed, what: str) -> list[DPOSample]:
    from qwenkit.train.preference_data import load_preference_pairs

    pairs, report = load_preference_pairs(path, tokenizer, recipe.data.max_len, recipe.data.strict)
    if env.main:
        print(f"dpo {what}: {report.ok} pairs, {report.skipped} skipped, {report.truncated} with history cut")
        for error in report.errors[:3]:
            print(f"  skipped {error}")
    if not pairs:
        raise QwenkitError(f"no usable preference pairs in {path}")
    return [make_sample(pair) for pair in pairs]


def run(recipe: DPORecipe, out: Path) -> Path | None:
    d = recipe.data
    if not d.path:  # before the model loads: it may be large
        raise QwenkitError("no preference data: pass --data FILE")
    env = loop.start(recipe, out)
    model, tokenizer = prepare_model(recipe, env)
    samples = load_pairs(d.path, tokenizer, recipe, env, "data")
    if d.eval_path:
        train, held_out = samples, load_pairs(d.eval_path, tokenizer, recipe, env, "held-out data")
    else:
        held = round(len(samples) * d.val_fraction)
        if held == len(samples):
            raise QwenkitError(f"data.val_fraction {d.val_fraction} holds out all {held} pairs")
        train, held_out = samples[held:], samples[:held]
    frozen = None
    if recipe.dpo.precompute_reference:
        precompute_reference(model, train + held_out, recipe.train.micro_batch_size, tokenizer.pad_id, env)
    elif recipe.model.method == "full":  # a frozen copy of the initial weights
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    lora = recipe.model.method == "lora"
    task = loop.Task("dpo", model, tokenizer, train, held_out,
                     lambda rows: collate_pairs(rows, tokenizer.pad_id), d.max_len,
                     loss=make_loss(recipe, frozen), adapter=lora)  # fmt: skip
    return loop.train(recipe, out, env, task)


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = load_recipe(DPORecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        what = f"model: {final}" if recipe.model.method == "full" else f"adapter: {final / 'adapter'}"
        print(f"DPO done in {time.perf_counter() - started:.0f}s; {what}")
    return 0
