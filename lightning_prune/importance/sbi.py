"""SBI (paper 004 Alg. 1 l.28-32, Eq. 1'; LLM-streamline, 004 App. A) as a per-layer score.

SBI_{s;s+m'} = 1 − E_t cos(H^(s−1)_t, H^(s+m')_t) is the block influence of the window of
m' + 1 consecutive layers starting at s: the input of layer s against the output of layer
s + m' (CoMe merges the window with the lowest SBI). A layer gets the **mean SBI of the
windows that contain it**:

    score_l = mean_{s : s ≤ l ≤ s + m'} SBI_{s;s+m'},

so a layer inside a redundant stretch scores low. The mean, not the minimum, is used: with
the minimum, both layers of the lowest window would tie and the index would decide; with the
mean each is separated by its other windows. ``m' = options.block_size`` (default 1, the
two-layer windows of CoMe's code and of :class:`lightning_prune.merging.statistics.LayerStatistics`).
"""

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.importance.base import ScoringOptions, check_blocks
from lightning_prune.importance.block_influence import span_influence
from lightning_prune.model.anatomy import Anatomy

__all__ = ["sbi", "layer_scores_from_windows"]


def layer_scores_from_windows(window: torch.Tensor, skip: int) -> torch.Tensor:
    """Mean over the windows containing each layer of the window scores.

    Args:
        window: SBI_{s;s+skip} per start s, shape (num_layers − skip,).
        skip: m', the window holds ``skip + 1`` layers.

    Returns:
        fp32 scores, shape (num_layers,).
    """
    num_layers = len(window) + skip
    sums, counts = torch.zeros(num_layers, dtype=torch.float64), torch.zeros(num_layers, dtype=torch.float64)
    for start, value in enumerate(window.double().tolist()):
        sums[start : start + skip + 1] += value
        counts[start : start + skip + 1] += 1
    return (sums / counts).float()


def sbi(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """Per-layer SBI: mean of SBI_{s;s+m'} (Eq. 1') over the windows containing the layer.

    Returns:
        fp32 scores, shape (num_layers,); higher = the layer sits in less redundant windows.
    """
    blocks = check_blocks(data, "sbi")
    num_layers, skip = Anatomy(model).num_layers, options.block_size
    if not 1 <= skip < num_layers:
        raise InputError(
            f"block_size={skip} (layers skipped in an SBI window, m') must be in 1..{num_layers - 1} "
            f"for a {num_layers}-layer model; 1 gives CoMe's two-layer windows"
        )
    window = span_influence(model, blocks, skip + 1, options)[: num_layers - skip]
    return layer_scores_from_windows(window, skip)
