"""AdamW with the report's settings (decay on matrices only) and the learning-rate schedule:
linear warmup, then cosine decay to a floor or a constant peak (report §2.3)."""

from __future__ import annotations

import math

import torch


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
