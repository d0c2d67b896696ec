"""One entry point for the merge variants: ``come``, ``come_p`` and the ``sum`` baseline."""

from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.merging.come import check_merge_options, check_merge_support, check_norm_options, concat_merge, sum_merge
from lightning_prune.merging.posterior import posterior_ratios
from lightning_prune.merging.progressive import MergeRecord, heuristic_ratios, progressive_merge

__all__ = ["MERGE_METHODS", "check_merge_request", "merge_model"]

MERGE_METHODS = ("come", "come_p", "sum")


def _check_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise InputError(f"merge method {method!r} is not known; choose one of {', '.join(MERGE_METHODS)}")


def _check_norm_request(method: str, norm_rule: str, parts: str) -> None:
    check_norm_options(norm_rule, parts)
    if method == "sum" and (norm_rule, parts) != ("mean", "both"):
        raise InputError("merge method 'sum' averages every parameter by ratio; norm_rule and parts apply to come and come_p only")


def check_merge_request(config, method: str, num_layers: int, p: float, rho: float, *, norm_rule: str = "mean", parts: str = "both") -> int:
    """Validate a request to merge away ``num_layers`` layers (before weights load); return the target depth."""
    _check_method(method)
    _check_norm_request(method, norm_rule, parts)
    check_merge_support(config)
    depth = config.num_hidden_layers
    if not 1 <= num_layers < depth:
        raise InputError(f"num_layers {num_layers} (layers to merge away) must be in 1..{depth - 1} for this {depth}-layer model")
    check_merge_options(depth - num_layers, depth, p, rho)
    return depth - num_layers


def merge_model(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target_depth: int,
    *,
    method: str = "come",
    p: float = 1.0,
    rho: float = 0.0,
    remerge: bool = True,
    grid: int = 20,
    norm_rule: str = "mean",
    parts: str = "both",
    progress: bool = True,
) -> MergeRecord:
    """Merge ``model`` in place down to ``target_depth`` layers.

    Args:
        model: a supported causal LM.
        batches: calibration token ids, each (B, T).
        target_depth: depth after merging (1..depth-1).
        method: ``come`` (Alg. 1), ``come_p`` (Alg. 2, grid search) or ``sum`` (weight average
            with CoMe's ratios).
        p: skew exponent of the ratios (come, sum).
        rho: minimum retention of the dominant layer (come, sum).
        remerge: allow merging an already merged layer again.
        grid: CoMe-P grid size n (n + 1 candidates).
        norm_rule: merged layer norms (come, come_p): ``mean`` (App. C), ``weighted`` (by
            ratio) or ``dominant`` (the largest-ratio layer's).
        parts: sublayers concatenated (come, come_p): ``both`` (paper), ``attention`` or
            ``ffn`` (the other copied from the largest-ratio layer).
        progress: show progress bars.
    """
    _check_method(method)
    _check_norm_request(method, norm_rule, parts)
    check_merge_support(model)
    check_merge_options(target_depth, model.config.num_hidden_layers, p, rho)
    batches = list(batches)
    options = {"norm_rule": norm_rule, "parts": parts}
    rule = posterior_ratios(batches, grid, **options, progress=progress) if method == "come_p" else heuristic_ratios(p, rho)
    combine = sum_merge if method == "sum" else concat_merge
    return progressive_merge(model, batches, target_depth, ratio_rule=rule, combine=combine, remerge=remerge, **options, progress=progress)
