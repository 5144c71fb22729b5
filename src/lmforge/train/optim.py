"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """Decay matrices (dim >= 2: linear weights, embeddings); never norms or biases (as in nanoGPT).
    Fused AdamW when every parameter is on CUDA, multi-tensor (foreach) otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    warmup: linear from lr/warmup to lr over ``warmup_steps``; then
    cosine: min + (lr - min) * (1 + cos(pi * progress)) / 2;  linear: straight down to min;
    wsd (warmup-stable-decay): flat at lr, then linear to min over the last ``decay_fraction`` of steps;
    constant: lr.  min = lr * min_lr_ratio.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr + (floor - lr) * progress
    if schedule == "wsd":
        decay_start = max_steps - int(decay_fraction * max_steps)
        if step < decay_start:
            return lr
        return lr + (floor - lr) * min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    raise ValueError(f"unknown schedule {schedule!r}")
