"""Seeded random baseline: uniform scores, a fresh draw for every depth."""

import torch
from torch import nn

from lightning_prune.importance.base import ScoringOptions
from lightning_prune.model.anatomy import Anatomy

__all__ = ["random_scores"]


def random_scores(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """Uniform [0, 1) scores from a generator seeded with ``(seed, current depth)``.

    Returns:
        fp32 scores, shape (num_layers,); identical on every rank for the same seed.
    """
    num_layers = Anatomy(model).num_layers
    generator = torch.Generator().manual_seed(options.seed * 1009 + num_layers)
    return torch.rand(num_layers, generator=generator, dtype=torch.float32)
