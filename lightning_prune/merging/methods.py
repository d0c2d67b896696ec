"""One entry point for the merge variants: ``come``, ``come_p`` and the ``sum`` baseline."""

from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.merging.come import check_merge_options, check_merge_support, concat_merge, sum_merge
from lightning_prune.merging.posterior import posterior_ratios
from lightning_prune.merging.progressive import MergeRecord, heuristic_ratios, progressive_merge
from lightning_prune.model.anatomy import Anatomy

__all__ = ["MERGE_METHODS", "check_merge_request", "merge_model"]

MERGE_METHODS = ("come", "come_p", "sum")


def check_merge_request(model: nn.Module, method: str, num_layers: int, p: float, rho: float) -> None:
    """Validate everything about a merge request before any calibration work."""
    if method not in MERGE_METHODS:
        raise InputError(f"merge method {method!r} is not known; choose one of {', '.join(MERGE_METHODS)}")
    check_merge_support(model)
    check_merge_options(num_layers, Anatomy(model).num_layers, p, rho)


def merge_model(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    num_layers: int,
    *,
    method: str = "come",
    p: float = 1.0,
    rho: float = 0.0,
    remerge: bool = True,
    grid: int = 20,
    progress: bool = True,
) -> MergeRecord:
    """Merge ``model`` in place down to ``num_layers`` layers.

    Args:
        model: a supported causal LM.
        batches: calibration token ids, each (B, T).
        num_layers: target depth.
        method: ``come`` (Alg. 1), ``come_p`` (Alg. 2, grid search) or ``sum`` (weight average
            with CoMe's ratios).
        p: skew exponent of the ratios (come, sum).
        rho: minimum retention of the dominant layer (come, sum).
        remerge: allow merging an already merged layer again.
        grid: CoMe-P grid size n (n + 1 candidates).
        progress: show progress bars.
    """
    check_merge_request(model, method, num_layers, p, rho)
    batches = list(batches)
    rule = posterior_ratios(batches, grid, progress=progress) if method == "come_p" else heuristic_ratios(p, rho)
    combine = sum_merge if method == "sum" else concat_merge
    return progressive_merge(model, batches, num_layers, ratio_rule=rule, combine=combine, remerge=remerge, progress=progress)
