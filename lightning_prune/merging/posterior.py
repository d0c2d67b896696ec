"""CoMe-P: retention ratios chosen by calibration loss over a grid (paper 004 Alg. 2, spec (f)).

For the chosen two-layer window every candidate ``r in {i/n : i = 0..n}`` (lower layer gets
``r``, upper ``1 - r``) is merged with the same sensitivities, concatenation and norm
averaging as CoMe, and scored by the summed next-token NLL on the calibration blocks; the
smallest wins. The prefix before the window is computed once (captured inputs of the
window's first layer) and only the suffix is replayed per candidate.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import capture_layer_inputs, run_layers
from lightning_prune.errors import InputError
from lightning_prune.merging.come import concat_merge
from lightning_prune.merging.progressive import RatioRule
from lightning_prune.merging.statistics import LayerStatistics
from lightning_prune.model.anatomy import Anatomy

__all__ = ["candidate_ratios", "window_losses", "posterior_ratios"]


def candidate_ratios(grid: int = 20) -> list[torch.Tensor]:
    """The ``grid + 1`` candidates ``[i/n, 1 - i/n]``, each shape (2,)."""
    if grid < 1:
        raise InputError(f"grid {grid} must be a positive number of steps (the paper uses 20)")
    return [torch.tensor([i / grid, 1 - i / grid]) for i in range(grid + 1)]


def _summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of next-token NLL of (B, T, V) logits for ids (B, T), in fp32."""
    return float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten().to(logits.device), reduction="sum"))


@torch.no_grad()
def window_losses(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    start: int,
    stats: LayerStatistics,
    candidates: Sequence[torch.Tensor],
    *,
    norm_rule: str = "mean",
    parts: str = "both",
    progress: bool = True,
) -> list[float]:
    """Calibration NLL of the model with layers ``start, start + 1`` merged with each candidate ratio.

    ``norm_rule`` / ``parts`` are passed to :func:`~lightning_prune.merging.come.concat_merge`.
    """
    anatomy = Anatomy(model)
    inputs = capture_layer_inputs(model, batches, start)
    window = [anatomy.layers[start], anatomy.layers[start + 1]]
    positions = [start, *range(start + 2, anatomy.num_layers)]
    losses = []
    try:
        for ratios in tqdm(candidates, desc="CoMe-P grid", disable=not progress, leave=False):
            sensitivities = (stats.attention[start : start + 2], stats.ffn[start : start + 2])
            anatomy.layers[start] = concat_merge(model, window, ratios, *sensitivities, norm_rule=norm_rule, parts=parts)
            total = 0.0
            for index, ids in enumerate(batches):
                hidden = run_layers(model, inputs.hidden[index], inputs.kwargs[index], positions)
                total += _summed_nll(anatomy.head(hidden), ids)
            losses.append(total)
    finally:
        anatomy.layers[start] = window[0]
    return losses


def posterior_ratios(
    batches: Sequence[torch.Tensor], grid: int = 20, *, norm_rule: str = "mean", parts: str = "both", progress: bool = True
) -> RatioRule:
    """A :data:`RatioRule` choosing the grid candidate with the smallest calibration NLL.

    Candidates are scored with the same ``norm_rule`` / ``parts`` the merge then uses (with
    ``dominant`` norms the candidates ``r in {0, 1}`` are exactly removing one layer).
    """
    candidates = candidate_ratios(grid)
    options = {"norm_rule": norm_rule, "parts": parts}

    def rule(model: nn.Module, start: int, stats: LayerStatistics) -> torch.Tensor:
        losses = window_losses(model, batches, start, stats, candidates, **options, progress=progress)
        return candidates[min(range(len(losses)), key=losses.__getitem__)]

    return rule
