"""Masks of kept weights: exact per-row counts, N:M patterns, applying and measuring them.

A mask is a bool tensor shaped like the weight (C_out, C_in), ``True`` = kept. Masks are
keyed ``"layers.{i}.{role}"`` (role from :meth:`Anatomy.linears`), so the same keys find
the weights in a plain model, in a peft-wrapped one and after ``merge_and_unload``.
"""

from collections.abc import Iterator

import torch
from torch import nn

from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "NMPattern",
    "apply_masks",
    "base_linear",
    "flat_keep_mask",
    "mask_gradients",
    "masks_from_model",
    "measure_sparsity",
    "nm_keep_mask",
    "prunable_linears",
    "row_counts",
    "topk_keep_mask",
    "unwrap_model",
]


class NMPattern(tuple):
    """``(n, m)``: in every group of ``m`` consecutive input weights of a row, ``n`` are kept."""

    def __new__(cls, n: int, m: int):
        return super().__new__(cls, (int(n), int(m)))

    @property
    def n(self) -> int:
        return self[0]

    @property
    def m(self) -> int:
        return self[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def row_counts(num_rows: int, num_cols: int, sparsity: float) -> torch.Tensor:
    """Weights to prune in each row, shape (num_rows,), summing to ``round(sparsity·rows·cols)``.

    Every row gets ``floor`` or ``floor + 1`` of the per-row share, the first rows taking the
    remainder, so the matrix total is exact and no row differs from another by more than one.
    """
    total = round(sparsity * num_rows * num_cols)
    base, extra = divmod(total, num_rows)
    counts = torch.full((num_rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def topk_keep_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the ``counts[r]`` lowest-scoring weights of each row ``r`` (ties broken by position).

    Args:
        scores: (C_out, C_in) importance, higher = keep.
        counts: (C_out,) weights to prune per row.

    Returns:
        bool keep mask (C_out, C_in) with exactly ``C_in - counts[r]`` ``True`` in row ``r``.
    """
    order = torch.sort(scores.float(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks >= counts.to(scores.device)[:, None]


def flat_keep_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune the ``count`` lowest scores of the whole tensor, all rows together (ties by position).

    One threshold over the matrix (or block) instead of one per row: rows may lose different
    numbers of weights, the total is exactly ``count``.
    """
    order = torch.sort(scores.float().flatten(), stable=True).indices
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[: int(count)]] = False
    return keep.reshape(scores.shape)


def nm_keep_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns (C_in % m == 0)."""
    rows, cols = scores.shape
    groups = scores.float().reshape(rows, cols // pattern.m, pattern.m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(pattern.n, dim=2, sorted=False).indices, True)
    return keep.reshape(rows, cols)


def base_linear(module: nn.Module) -> nn.Module:
    """The module that owns the weight: the base layer of a peft LoRA wrapper, else itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (its LoRA layers stay injected), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prunable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``("layers.{i}.{role}", linear)`` for every q/k/v/o/gate/up/down projection of the decoder.

    Embeddings and ``lm_head`` are never included. A peft-wrapped model yields its base layers.
    """
    anatomy = Anatomy(unwrap_model(model))
    for index, layer in enumerate(anatomy.layers):
        for role, linear in anatomy.linears(layer).items():
            yield f"layers.{index}.{role}", base_linear(linear)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask (in place). Use after ``merge_and_unload`` too."""
    linears = dict(prunable_linears(model))
    for name, mask in masks.items():
        weight = linears[name].weight
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights (in place), so optimizer moments stay zero there."""
    linears = dict(prunable_linears(model))
    for name, mask in masks.items():
        grad = linears[name].weight.grad
        if grad is not None:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


def masks_from_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep masks read back from the weights (non-zero = kept)."""
    return {name: linear.weight.detach() != 0 for name, linear in prunable_linears(model)}


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> dict:
    """Fraction of exact zeros over all prunable linear weights, overall and per decoder layer."""
    zeros: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for name, linear in prunable_linears(model):
        index = int(name.split(".")[1])
        zeros[index] = zeros.get(index, 0) + int((linear.weight == 0).sum())
        sizes[index] = sizes.get(index, 0) + linear.weight.numel()
    overall = sum(zeros.values()) / max(sum(sizes.values()), 1)
    return {"overall": overall, "per_layer": [zeros[i] / sizes[i] for i in sorted(sizes)]}
