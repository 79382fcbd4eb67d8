"""PPO against a reward model (report §3.2.2, "Training recipes"): four models — the policy being
trained, a value model initialised from the reward model, a frozen reference (the starting policy;
with a LoRA policy, the same weights with the adapter off) and the frozen reward model.

Each step samples `rollout.responses_per_query` responses (top-p 0.9) to each of
`rollout.queries_per_step` prompts with qwenkit's batched decoding core, scores them, and updates:

- the score of a response is the reward model's at its final `<|im_end|>`, normalised by a running
  mean and standard deviation over all finished responses so far (`ppo.normalize`);
- a response that never ends (no `<|im_end|>` within `rollout.max_new_tokens`) is not scored by the
  reward model, which was trained on finished conversations only: its normalised score is the fixed
  `-rollout.unfinished_penalty` (as TRL's and OpenRLHF's missing-EOS penalty, but in normalised units);
- per-token rewards: -kl_coef * (log pi - log pi_ref) at every response token, plus the score at
  the last one; advantages by GAE (gamma, lambda) over the response tokens, whitened per step;
- losses: PPO's clipped policy objective and the clipped value loss (value_clip 0.15), each model
  with its own AdamW and learning rate; for the first `ppo.value_warmup_steps` steps only the value
  model trains; an optional PPO-ptx term adds `ptx.coef` x the language-model loss on SFT data.

The loop is its own (rollouts, two models, two optimizers) but made of the shared pieces: the run
directory, recipe sections, metrics.jsonl, the schedule, atomic checkpoints in OUT/checkpoints
(the policy as an ordinary model directory or LoRA adapter, the value model beside it in `value/`),
exact resume (weights, both optimizers, running reward statistics, RNG, step).

    qwenkit ppo --config configs/ppo/qwen-chat.yaml --policy ./Qwen-7B-Chat --reward runs/rm \\
        --data prompts.jsonl --out runs/ppo
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from qwenkit.errors import QwenkitError
from qwenkit.train import loop
from qwenkit.train.checkpointing import (
    commit_trainer_state,
    latest_checkpoint,
    set_rng_state,
    staging_dir,
)
from qwenkit.train.distributed import Distributed
from qwenkit.train.metrics import Metrics
from qwenkit.train.optimizer import learning_rate, make_optimizer
from qwenkit.train.settings import (
    CheckpointSection,
    LogSection,
    TrainSection,
    load_recipe,
    recipe_to_dict,
    setting,
)

# --- the recipe ----------------------------------------------------------------------------------


@dataclass
class PPOModelSection:
    policy: str = ""  # the chat model to align, or a run directory (--policy; empty: the demo model)
    reward: str = ""  # the reward model (--reward); the value model starts as a copy of it
    method: str = setting("full", choices=("full", "lora"))  # lora: the reference is the adapter off
    lora_r: int = setting(64, min=1)
    lora_alpha: int = setting(16, min=1)
    lora_dropout: float = setting(0.0, min=0, max=0)  # only 0: the networks run in eval mode (no dropout)


@dataclass
class PPODataSection:
    path: str = (
        ""  # prompts, JSONL: {"prompt": str | messages} or {"messages": [... ending with a user turn]}
    )
    max_prompt_len: int = setting(512, min=2)  # longer prompts are skipped and counted
    strict: bool = False  # fail on the first malformed prompt instead of skipping it


@dataclass
class RolloutSection:
    queries_per_step: int = setting(32, min=1)
    responses_per_query: int = setting(2, min=1)  # the report samples two
    max_new_tokens: int = setting(256, min=1)
    temperature: float = setting(1.0, above=0)
    top_p: float = setting(0.9, above=0, max=1)
    top_k: int = setting(0, min=0)
    unfinished_penalty: float = setting(1.0, min=0)  # normalised score of a response that never ends


@dataclass
class PPOSection:
    kl_coef: float = setting(0.04, min=0)
    gamma: float = setting(1.0, min=0, max=1)
    lam: float = setting(0.95, min=0, max=1)
    clip: float = setting(0.2, above=0)  # the policy ratio's clip range
    value_clip: float = setting(0.15, above=0)
    value_lr: float = setting(5e-6, above=0)  # the policy's is train.lr
    value_warmup_steps: int = setting(50, min=0)  # only the value model trains before this step
    epochs: int = setting(1, min=1)  # passes over each step's rollouts
    normalize: str = setting("mean_std", choices=("mean_std", "mean", "none"))  # running reward statistics
    whiten_advantages: bool = True


@dataclass
class PtxSection:
    path: str = ""  # SFT conversations for the pretraining-gradient term (empty: no PPO-ptx)
    coef: float = setting(0.0, min=0)
    max_len: int = setting(512, min=2)
    micro_batch_size: int = setting(4, min=1)


@dataclass
class PPORecipe:
    model: PPOModelSection = field(default_factory=PPOModelSection)
    data: PPODataSection = field(default_factory=PPODataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    ptx: PtxSection = field(default_factory=PtxSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


# --- the loss math (tested on fixed tensors against plain loops) ---------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1 (token-level)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std over the masked positions (unbiased variance); 0 elsewhere."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> torch.Tensor:  # fmt: skip
    """Per-token rewards [N, T]: -kl_coef * (log pi - log pi_ref) at every response token, plus each
    response's score [N] at its last token."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Generalised advantage estimation over right-padded responses [N, T] (Schulman et al. 2016):
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token), A_t = delta_t + gamma lam A_{t+1};
    returns = A + V. Padding gets 0."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        following = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PPO's clipped surrogate, negated: mean of max(-A r, -A clip(r, 1-eps, 1+eps)) over the response
    tokens, r = pi / pi_old; and the fraction of tokens where the clipped term is the larger."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old +
    clamp(V - V_old, -clip, clip); and the fraction of tokens where the clipped term is the larger."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update), for
    normalising rewards across steps; saved in checkpoints for exact resume."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double().flatten()
        n = values.numel()
        if n == 0:
            return
        mean, m2 = float(values.mean()), float(((values - values.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def normalize(self, values: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "none":
            return values
        centred = values - self.mean
        return centred / (self.std + 1e-8) if mode == "mean_std" else centred

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of fp32 logits [..., V]."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# --- rollouts ------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """A step's sampled responses, right-padded: `sequences` [N, W] (prompt + response), `positions`
    [N, T] (the column whose logits predict each response token), `responses` [N, T], `mask` [N, T],
    and per token the rollout policy's and reference's log-probabilities, the values, rewards,
    advantages and returns; `scores` [N] raw reward-model scores, `finished` [N]."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    finished: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Rollouts:
        """The rollouts at `index`, trimmed to their own longest sequence and response."""
        width, span = int(self.lengths[index].max()), int(self.mask[index].sum(dim=1).max())
        picked = {}
        for name, value in vars(self).items():
            if value is None:
                picked[name] = None
                continue
            value = value[index]
            if name == "sequences":
                value = value[:, :width]
            elif value.dim() == 2:
                value = value[:, :span]
            picked[name] = value
        return Rollouts(**picked)


def response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Right-padded (sequences [N, W], lengths [N], positions [N, T], responses [N, T], mask [N, T])."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width, span = max(lengths), max(len(r) for r in responses)
    sequences = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(prompts), span), dtype=torch.long)
    tokens = torch.full((len(prompts), span), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), span))
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        sequences[i, : lengths[i]] = torch.tensor(prompt + response)
        positions[i] = torch.arange(len(prompt) - 1, len(prompt) - 1 + span).clamp(max=width - 1)
        tokens[i, : len(response)] = torch.tensor(response)
        mask[i, : len(response)] = 1
    return sequences, torch.tensor(lengths), positions, tokens, mask


def response_logits(model, sequences: torch.Tensor, positions: torch.Tensor, vocab_size: int,
                    temperature: float) -> torch.Tensor:  # fmt: skip
    """fp32 logits [N, T, vocab_size] that predict each response token, divided by the temperature
    (the sampling distribution before top-p), the embedding's padding rows left out."""
    hidden = model.hidden_states(sequences)  # the head on response positions only: no prompt-length logits
    picked = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return model.lm_head(picked)[..., :vocab_size].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


# --- the run -------------------------------------------------------------------------------------


class PPOTrainer:
    """The four models, the two optimizers, the prompt order and the running reward statistics."""

    def __init__(self, recipe: PPORecipe, out: Path, env: Distributed):
        from qwenkit.chatml import render_messages
        from qwenkit.checkpoint import load
        from qwenkit.generation import context_length
        from qwenkit.train.preference_data import read_prompts
        from qwenkit.train.reward import load_reward_model, resolve_run

        self.recipe, self.out, self.env = recipe, out, env
        m, device = recipe.model, env.device
        source = resolve_run(m.policy) if m.policy else None  # None: the embedded demo model
        policy, tokenizer = load(source, device=device, dtype="float32")
        self.tokenizer, self.generation_config = tokenizer, policy.generation_config
        r = recipe.rollout
        window = context_length(policy)
        if recipe.data.max_prompt_len + r.max_new_tokens > window:
            raise QwenkitError(f"data.max_prompt_len + rollout.max_new_tokens "
                               f"({recipe.data.max_prompt_len} + {r.max_new_tokens}) exceeds the policy's "
                               f"context window of {window} tokens")  # fmt: skip
        self.reward_model, reward_tokenizer = load_reward_model(m.reward, device=device, dtype="float32")
        if (
            reward_tokenizer.vocab_size != tokenizer.vocab_size
            or reward_tokenizer.im_end_id != tokenizer.im_end_id
        ):
            raise QwenkitError(f"the reward model {m.reward} does not share the policy's vocabulary")
        self.reward_model.requires_grad_(False).eval()
        self.value, _ = load_reward_model(m.reward, device=device, dtype="float32")
        self.value.eval()  # no dropout in the network: eval mode keeps rollout and update passes identical
        if m.method == "lora":
            from qwenkit.lora import add_lora

            self.policy = add_lora(policy, m.lora_r, m.lora_alpha, m.lora_dropout)
            self.reference = None  # the adapter off
        else:
            self.policy = policy
            self.reference = load(source, device=device, dtype="float32")[0].requires_grad_(False).eval()
        self.policy.eval()
        t = recipe.train
        self.policy_optimizer = make_optimizer(self.policy, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
        self.value_optimizer = make_optimizer(self.value, recipe.ppo.value_lr, t.weight_decay,
                                              (t.beta1, t.beta2), t.eps)  # fmt: skip
        self.moments = RunningMoments()

        errors: list[str] = []
        messages = read_prompts(recipe.data.path, recipe.data.strict, errors)
        prompts = [
            render_messages(tokenizer, conversation, prompt=True).input_ids for conversation in messages
        ]
        self.prompts = [p for p in prompts if len(p) <= recipe.data.max_prompt_len]
        if env.main:
            print(f"ppo prompts: {len(self.prompts)} used, {len(errors)} malformed and "
                  f"{len(prompts) - len(self.prompts)} longer than data.max_prompt_len skipped")  # fmt: skip
            for error in errors[:3]:
                print(f"  skipped {error}")
        if not self.prompts:
            raise QwenkitError(f"no usable prompts in {recipe.data.path}")
        self.batches = loop.StepBatches(self.prompts, r.queries_per_step, 1, env, t.seed, list)
        self.ptx = None
        if recipe.ptx.path and recipe.ptx.coef > 0:
            from qwenkit.train.sft import pad_conversations
            from qwenkit.train.sft_data import load_sft_samples

            samples, ptx_report = load_sft_samples(
                recipe.ptx.path, tokenizer, recipe.ptx.max_len, "qwenkit", False
            )
            if not samples:
                raise QwenkitError(f"no usable ptx samples in {recipe.ptx.path}")
            if env.main:
                print(f"ppo-ptx data: {ptx_report.ok} samples, {ptx_report.skipped} skipped")
            self.ptx = loop.StepBatches(samples, recipe.ptx.micro_batch_size, 1, env, t.seed + 1,
                                        lambda rows: pad_conversations(rows, tokenizer.pad_id))  # fmt: skip

    @property
    def lora(self) -> bool:
        return self.recipe.model.method == "lora"

    def generator_model(self):
        """The Qwen network the policy samples with (under peft, with the adapter on)."""
        return self.policy.get_base_model() if self.lora else self.policy

    def reference_logits(self, sequences, positions):
        vocab, temperature = self.tokenizer.vocab_size, self.recipe.rollout.temperature
        if self.reference is not None:
            return response_logits(self.reference, sequences, positions, vocab, temperature)
        with self.policy.disable_adapter():
            return response_logits(self.policy, sequences, positions, vocab, temperature)

    @torch.no_grad()
    def rollout(self, step: int) -> Rollouts:
        """Sample, then score in micro-batches: log-probabilities, reference, values, reward."""
        from qwenkit.generation import generate_text

        r, t, device = self.recipe.rollout, self.recipe.train, self.env.device
        queries = self.batches.micro_batches(step)[0]
        prompts = [list(q) for q in queries for _ in range(r.responses_per_query)]
        continuations = generate_text(
            self.generator_model(), self.tokenizer, prompts,
            seed=(t.seed * 1_000_003 + step) % 2**63, cuda_graph=not self.lora,
            max_new_tokens=r.max_new_tokens, do_sample=True, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, repetition_penalty=1.0, eos_token_id=self.tokenizer.im_end_id, stop_words_ids=[],
        )  # fmt: skip
        responses = [c.ids or [self.tokenizer.pad_id] for c in continuations]
        finished = torch.tensor([c.finish_reason == "stop" for c in continuations])
        sequences, lengths, positions, tokens, mask = response_batch(
            prompts, responses, self.tokenizer.pad_id
        )
        parts: dict[str, list[torch.Tensor]] = {}
        vocab, temperature = self.tokenizer.vocab_size, r.temperature
        for index in torch.arange(len(prompts)).split(t.micro_batch_size):
            width, span = int(lengths[index].max()), positions.shape[1]
            seq, pos, tok = (
                sequences[index, :width].to(device),
                positions[index].to(device),
                tokens[index].to(device),
            )
            pos = pos.clamp(max=width - 1)
            with loop.autocast(device):
                logits = response_logits(self.policy, seq, pos, vocab, temperature)
                ref = self.reference_logits(seq, pos)
                values = self.value(seq).gather(1, pos)
                attention = (torch.arange(width)[None] < lengths[index, None]).long().to(device)
                scores = self.reward_model.rewards(seq, attention)
            found = {"logprobs": token_logprobs(logits, tok), "ref_logprobs": token_logprobs(ref, tok),
                     "entropy": entropy_of(logits), "values": values.float(), "scores": scores.float()}  # fmt: skip
            for name, value in found.items():
                parts.setdefault(name, []).append(value.cpu()[:, :span] if value.dim() == 2 else value.cpu())
        joined = {name: torch.cat(values) for name, values in parts.items()}
        return Rollouts(sequences, lengths, positions, tokens, mask, finished=finished, **joined)

    def shape_rewards(self, rollouts: Rollouts) -> None:
        """Normalised scores (fixed penalty for unfinished responses), KL-shaped rewards, GAE."""
        p, r = self.recipe.ppo, self.recipe.rollout
        self.moments.update(rollouts.scores[rollouts.finished])
        normalized = self.moments.normalize(rollouts.scores, p.normalize)
        normalized = torch.where(
            rollouts.finished, normalized, torch.full_like(normalized, -r.unfinished_penalty)
        )
        rewards = kl_shaped_rewards(
            normalized, rollouts.logprobs, rollouts.ref_logprobs, rollouts.mask, p.kl_coef
        )
        advantages, returns = gae(rewards, rollouts.values, rollouts.mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, rollouts.mask)
        rollouts.advantages, rollouts.returns = advantages, returns

    def update(self, step: int, rollouts: Rollouts) -> dict[str, float]:
        """PPO epochs over the rollouts in optimizer steps of micro_batch_size x grad_accum rollouts."""
        t, p, device = self.recipe.train, self.recipe.ppo, self.env.device
        train_policy = step >= p.value_warmup_steps
        vocab, temperature = self.tokenizer.vocab_size, self.recipe.rollout.temperature
        count = len(rollouts.scores)
        per_update = t.micro_batch_size * t.grad_accum
        sums: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed((t.seed * 1_000_003 + step) % 2**63)
        for _ in range(p.epochs):
            order = torch.randperm(count, generator=generator)
            for group in order.split(per_update):
                micro = group.split(t.micro_batch_size)
                for index in micro:
                    batch = rollouts.rows(index)
                    seq, pos = batch.sequences.to(device), batch.positions.to(device)
                    pos = pos.clamp(max=seq.shape[1] - 1)
                    mask, old_logprobs = batch.mask.to(device), batch.logprobs.to(device)
                    advantages = batch.advantages.to(device)
                    with loop.autocast(device):
                        values = self.value(seq).gather(1, pos).float()
                        v_loss, v_clipfrac = value_loss(values, batch.values.to(device), batch.returns.to(device),
                                                        mask, p.value_clip)  # fmt: skip
                        loss = v_loss
                        if train_policy:
                            logits = response_logits(self.policy, seq, pos, vocab, temperature)
                            logprobs = token_logprobs(logits, batch.responses.to(device))
                        else:
                            logprobs = old_logprobs
                        pg_loss, clipfrac = policy_loss(logprobs, old_logprobs, advantages, mask, p.clip)
                        if train_policy:
                            loss = loss + pg_loss
                    (loss / len(micro)).backward()
                    found = {"policy_loss": pg_loss, "value_loss": v_loss, "clipfrac": clipfrac,
                             "value_clipfrac": v_clipfrac}  # fmt: skip
                    for name, value in found.items():
                        sums.setdefault(name, []).append(float(value.detach()))
                if train_policy and self.ptx is not None:
                    ptx_loss = self.ptx_step(step)
                    sums.setdefault("ptx_loss", []).append(ptx_loss)
                self.step_optimizers(train_policy)
        return {name: sum(values) / len(values) for name, values in sums.items()}

    def ptx_step(self, step: int) -> float:
        """PPO-ptx: the language-model loss on one micro-batch of SFT data, x ptx.coef."""
        inputs, labels = (x.to(self.env.device) for x in self.ptx.micro_batches(step)[0])
        with loop.autocast(self.env.device):
            loss = loop.next_token_loss(self.policy, (inputs, labels))
        (self.recipe.ptx.coef * loss).backward()
        return float(loss.detach())

    def step_optimizers(self, train_policy: bool) -> None:
        clip = self.recipe.train.grad_clip
        torch.nn.utils.clip_grad_norm_(self.value.parameters(), clip)
        self.value_optimizer.step()
        self.value_optimizer.zero_grad(set_to_none=True)
        if train_policy:
            torch.nn.utils.clip_grad_norm_([q for q in self.policy.parameters() if q.requires_grad], clip)
            self.policy_optimizer.step()
        self.policy_optimizer.zero_grad(set_to_none=True)

    def set_learning_rates(self, step: int) -> tuple[float, float]:
        t = self.recipe.train
        rates = []
        for optimizer, peak in (
            (self.policy_optimizer, t.lr),
            (self.value_optimizer, self.recipe.ppo.value_lr),
        ):
            lr = learning_rate(step, peak, t.warmup_steps, t.max_steps, t.final_lr_ratio, t.decay)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rates.append(lr)
        return rates[0], rates[1]

    # --- checkpoints ---

    def save(self, step: int) -> None:
        from qwenkit.checkpoint import save_state_dict
        from qwenkit.train.reward import save_reward_model

        staging = staging_dir(self.out, step)
        extra = {}
        if self.lora:
            staging.mkdir(parents=True, exist_ok=True)
            self.policy.save_pretrained(str(staging / "adapter"))
            extra["trainable"] = {
                n: q.detach().cpu() for n, q in self.policy.named_parameters() if q.requires_grad
            }
        else:
            save_state_dict(self.policy.state_dict(), self.policy.config, self.generation_config, self.tokenizer,
                            staging, torch.float32)  # fmt: skip
        save_reward_model(self.value, self.tokenizer, staging / "value")
        commit_trainer_state(self.out, staging, step, self.policy_optimizer.state_dict(), self.recipe,
                             value_optimizer=self.value_optimizer.state_dict(),
                             reward_moments=self.moments.state_dict(), **extra)  # fmt: skip

    def resume(self) -> int:
        """Restore the latest checkpoint in OUT, if any; the step to continue from."""
        from qwenkit.checkpoint import iter_tensors, weight_files
        from qwenkit.train.reward import load_reward_model

        path = latest_checkpoint(self.out)
        if path is None:
            return 0
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        saved = state.get("recipe", {}).get("model", {}).get("method", self.recipe.model.method)
        if saved != self.recipe.model.method:
            raise QwenkitError(f"{path} was trained with --model.method {saved}; resume with the same method "
                               f"or start in another --out")  # fmt: skip
        if self.lora:
            self.policy.load_state_dict(state["trainable"], strict=False)
        else:
            weights = dict(iter_tensors(weight_files(path)))
            if self.policy.config.tie_word_embeddings:
                weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
            self.policy.load_state_dict(weights)
        self.value.load_state_dict(load_reward_model(path / "value", device="cpu")[0].state_dict())
        self.policy_optimizer.load_state_dict(state["optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.moments.load_state_dict(state["reward_moments"])
        set_rng_state(state["rng"])
        return int(state["step"])


def plot_curves(metrics_file: Path, png: Path, title: str) -> None:
    """Mean reward and KL to the reference against step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "reward", "reward-model score"), (axes[1], "kl", "KL to the reference")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def fit(trainer: PPOTrainer, first_step: int) -> None:
    recipe, out, env = trainer.recipe, trainer.out, trainer.env
    t = recipe.train
    metrics = Metrics(out, env.main, recipe.log.tensorboard, first_step)
    progress = tqdm(total=t.max_steps, initial=first_step, disable=not (env.main and recipe.log.progress),
                    desc="ppo", unit="step", dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    for step in range(first_step, t.max_steps):
        lr, value_lr = trainer.set_learning_rates(step)
        started = time.perf_counter()
        rollouts = trainer.rollout(step)
        trainer.shape_rewards(rollouts)
        sampled = time.perf_counter()
        losses = trainer.update(step, rollouts)
        updated = time.perf_counter()
        done = step + 1
        if done % recipe.log.every == 0 or done == t.max_steps:
            lengths = rollouts.mask.sum(dim=1)
            tokens = float(rollouts.lengths.sum()) * recipe.ppo.epochs
            record = {
                "step": done,
                "reward": float(rollouts.scores.mean()),
                "kl": float(((rollouts.logprobs - rollouts.ref_logprobs) * rollouts.mask).sum(dim=1).mean()),
                **losses,
                "loss": losses["value_loss"]
                + (losses["policy_loss"] if step >= recipe.ppo.value_warmup_steps else 0.0),  # fmt: skip
                "entropy": float(masked_mean(rollouts.entropy, rollouts.mask)),
                "response_length": float(lengths.float().mean()),
                "unfinished": float((~rollouts.finished).float().mean()),
                "lr": lr,
                "value_lr": value_lr,
                "rollout_tokens_per_sec": float(lengths.sum()) / max(sampled - started, 1e-9),
                "update_tokens_per_sec": tokens / max(updated - sampled, 1e-9),
                "tokens_per_sec": float(rollouts.lengths.sum()) / max(updated - started, 1e-9),
            }
            metrics.log(record)
            progress.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                                 len=f"{record['response_length']:.0f}")  # fmt: skip
        progress.update(1)
        if (recipe.checkpoint.every and done % recipe.checkpoint.every == 0) or done == t.max_steps:
            trainer.save(done)
    progress.close()
    if env.main and metrics.file.exists():
        metrics.plot(out / "loss.png", f"ppo: {out.name}")
        plot_curves(metrics.file, out / "reward_kl.png", f"ppo: {out.name}")


def run(recipe: PPORecipe, out: Path) -> Path | None:
    m, r, t = recipe.model, recipe.rollout, recipe.train
    for value, flag in (
        (m.reward, "--reward DIR"),
        (recipe.data.path, "--data FILE"),
    ):
        if not value:
            raise QwenkitError(f"ppo needs {flag}")
    rollouts = r.queries_per_step * r.responses_per_query
    if rollouts % (t.micro_batch_size * t.grad_accum):
        raise QwenkitError(f"rollout.queries_per_step x rollout.responses_per_query ({rollouts}) must be a "
                           f"multiple of train.micro_batch_size x train.grad_accum "
                           f"({t.micro_batch_size * t.grad_accum})")  # fmt: skip
    if recipe.ptx.coef > 0 and not recipe.ptx.path:
        raise QwenkitError("ptx.coef is set but ptx.path is not: PPO-ptx needs SFT data (--ptx.path FILE)")
    if recipe.ppo.value_warmup_steps >= t.max_steps:
        raise QwenkitError(f"ppo.value_warmup_steps ({recipe.ppo.value_warmup_steps}) >= train.max_steps "
                           f"({t.max_steps}): the policy would never train")  # fmt: skip
    if t.compile or t.activation_checkpointing:
        raise QwenkitError("qwenkit ppo does not support train.compile or train.activation_checkpointing yet")
    env = loop.start(recipe, out)
    if env.world_size > 1:
        raise QwenkitError("qwenkit ppo runs in one process; torchrun is not supported yet")
    trainer = PPOTrainer(recipe, out, env)
    first_step = trainer.resume()
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    fit(trainer, first_step)
    final = latest_checkpoint(out)
    env.close()
    return final


def main(config: str | None, out: str, overrides: list[str]) -> int:
    recipe = load_recipe(PPORecipe, config, overrides)
    started = time.perf_counter()
    final = run(recipe, Path(out))
    if final is not None:
        what = f"policy: {final}" if recipe.model.method == "full" else f"adapter: {final / 'adapter'}"
        print(f"ppo done in {time.perf_counter() - started:.0f}s; {what} (value model: {final / 'value'})")
    return 0
