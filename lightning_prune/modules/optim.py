"""One optimizer set-up shared by every training stage: AdamW with linear warm-up then cosine decay."""

import math
from collections.abc import Iterable

import torch

__all__ = ["warmup_cosine", "adamw_cosine"]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear 0→1 over ``warmup_steps``, then cosine 1→``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_cosine(
    parameters: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
) -> dict:
    """A Lightning ``configure_optimizers`` dict: AdamW, per-step warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(list(parameters), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
