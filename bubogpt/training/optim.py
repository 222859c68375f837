"""Optimiser and learning-rate schedule, shared by BuboGPT's stages and the grounding models'
training (`bubogpt/grounding/training.py`): AdamW with weight decay on >= 2-D weights only, and a
linear warm-up followed by a cosine decay.

The two recipes differ only in the warm-up's first value (BuboGPT: `warmup_start_lr` at step 0;
grounding: 1/warmup of the peak at step 0, 0 before it), which `warmup_cosine` takes as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bubogpt.training.config import TrainConfig


def warmup_cosine(step: int, peak: float, floor: float, warmup_steps: int, total_steps: int,
                  start: float = 0.0, warmup_offset: int = 0) -> float:  # fmt: skip
    """Linear from `start` towards `peak` over `warmup_steps` (the value at `step` is at fraction
    (step + warmup_offset) / warmup_steps of the way), then cosine from `peak` to `floor` at
    `total_steps`; `floor` after that."""
    if step < warmup_steps:
        return start + (peak - start) * (step + warmup_offset) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lavis_warmup_cosine(step: int, peak: float, floor: float, warmup_steps: int, total_steps: int, start: float) -> float:
    """LAVIS's `LinearWarmupCosineLRScheduler` (lavis/common/optims.py), stepped before every
    iteration: linear from `start` (capped at `peak`) during the warm-up, then a cosine whose
    progress is step / total_steps over all steps, warm-up included."""
    if step < warmup_steps:
        return min(peak, start + (peak - start) * step / max(warmup_steps, 1))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def decay_groups(parameters: Iterable[nn.Parameter], weight_decay: float, **options: Any) -> list[dict[str, Any]]:
    """The trainable `parameters` as two AdamW groups, in their order: >= 2-D weights decay, biases,
    norms and scalars do not. `options` (e.g. a group's own `lr`) go into both groups."""
    trainable = [p for p in parameters if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay, **options},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, **options},
    ]


def adamw(groups: list[dict[str, Any]], betas: tuple[float, float] = (0.9, 0.999), **defaults: Any) -> torch.optim.AdamW:
    """AdamW over the non-empty groups."""
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=betas, **defaults)


# -- BuboGPT's stages --------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decay, no-decay] groups of the model's trainable parameters."""
    return decay_groups(model.parameters(), weight_decay)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return adamw(parameter_groups(model, config.weight_decay), betas=config.betas, lr=config.lr)


def learning_rate(step: int, config: TrainConfig) -> float:
    """The lr of optimiser step `step` (0-based): linear warm-up from `warmup_start_lr` towards `lr`
    over `warmup_steps`, then a cosine to `min_lr` at `max_steps`, the way `config.schedule` says
    (bubogpt/training/config.py, SCHEDULES)."""
    if config.schedule == "lavis":
        return lavis_warmup_cosine(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps, config.warmup_start_lr)
    return warmup_cosine(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps, start=config.warmup_start_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` following `learning_rate`; all groups share the base lr `config.lr`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, config) / config.lr)
