"""Mag+ (004 App. A after Kim et al. 2024): per layer, Σ|w| over all its weight matrices."""

import torch
from torch import nn

from lightning_prune.importance.base import ScoringOptions
from lightning_prune.model.anatomy import Anatomy

__all__ = ["magnitude"]


@torch.no_grad()
def magnitude(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """I_l = Σ_{W ∈ layer l} Σ_ij |W_ij| over the attention and MLP projection matrices.

    Data-free (``data`` is ignored). The "+" of Mag+ is the protection of the first four and
    last two layers, applied by selection (see ``DEFAULT_PROTECTION``).

    Returns:
        fp32 scores, shape (num_layers,).
    """
    anatomy = Anatomy(model)
    return torch.tensor(
        [sum(float(linear.weight.detach().float().abs().sum()) for linear in anatomy.linears(layer).values()) for layer in anatomy.layers],
        dtype=torch.float32,
    )
