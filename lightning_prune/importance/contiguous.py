"""CosSim(CL) (000, 004 App. A): block influence of ``block_size`` consecutive layers."""

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.importance.base import ScoringOptions, check_blocks
from lightning_prune.importance.block_influence import span_influence
from lightning_prune.model.anatomy import Anatomy

__all__ = ["contiguous"]


def contiguous(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """Score of the block starting at s: 1 − E_t cos(input of layer s, output of layer s+n−1), n = block_size.

    Returns:
        fp32 tensor (num_layers,) indexed by block start; starts whose block overruns are ``nan``.
    """
    num_layers = Anatomy(model).num_layers
    if not 1 <= options.block_size < num_layers:
        raise InputError(f"block_size={options.block_size} must be in 1..{num_layers - 1} for a {num_layers}-layer model")
    return span_influence(model, check_blocks(data, "contiguous"), options.block_size, options)
