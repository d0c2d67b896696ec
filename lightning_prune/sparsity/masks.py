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


_CHUNK = 1 << 22  # elements per selection step: int64 sort buffers never exceed this, whatever the matrix


def _row_chunks(rows: int, cols: int) -> range:
    """Row starts of chunks of about :data:`_CHUNK` elements (at least one row each)."""
    return range(0, rows, max(1, _CHUNK // max(cols, 1)))


def topk_keep_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the ``counts[r]`` lowest-scoring weights of each row ``r`` (ties broken by position).

    Rows are sorted in chunks of about :data:`_CHUNK` elements, so the int64 sort buffers stay
    that small whatever the matrix.

    Args:
        scores: (C_out, C_in) importance, higher = keep.
        counts: (C_out,) weights to prune per row.

    Returns:
        bool keep mask (C_out, C_in) with exactly ``C_in - counts[r]`` ``True`` in row ``r``.
    """
    rows, cols = scores.shape
    keep = torch.empty(rows, cols, dtype=torch.bool, device=scores.device)
    counts = counts.to(scores.device)
    for start in _row_chunks(rows, cols):
        chunk = scores[start : start + _row_chunks(rows, cols).step].float()
        order = torch.sort(chunk, dim=1, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand_as(order))
        keep[start : start + len(chunk)] = ranks >= counts[start : start + len(chunk), None]
    return keep


def _sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the fp32 ``values``: the bit pattern, negated for negatives (-0.0 and 0.0 alike)."""
    keys = values.view(torch.int32)
    return torch.where(keys < 0, -(keys & 0x7FFFFFFF), keys)


def _kth_key(keys: torch.Tensor, k: int) -> int:
    """The ``k``-th smallest (1-based) int32 key: two 16-bit histogram passes (radix select)."""
    high = (keys >> 16) + 32768
    cumulative = torch.bincount(high, minlength=65536).cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(k, device=keys.device)))
    below = int(cumulative[bucket - 1]) if bucket else 0
    low = torch.bincount(torch.where(high == bucket, keys & 0xFFFF, 65536), minlength=65537)[:65536].cumsum(0)
    offset = int(torch.searchsorted(low, torch.tensor(k - below, device=keys.device)))
    return ((bucket - 32768) << 16) | offset


def flat_keep_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune the ``count`` lowest scores of the whole tensor, all rows together (ties by position).

    One threshold over the matrix (or block) instead of one per row: rows may lose different
    numbers of weights, the total is exactly ``count``. The threshold is found by radix
    selection on an int32 view of the fp32 scores (no sort, no int64 copy of the matrix); of
    the scores equal to it, the first ones in row-major order are pruned.
    """
    count = int(count)
    flat = scores.detach().float().reshape(-1).contiguous()
    if count <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    keys = _sortable_keys(flat)
    threshold = _kth_key(keys, count)
    keep = keys >= threshold
    ties = count - int(torch.count_nonzero(keys < threshold))  # how many of the scores equal to the threshold go, first ones first
    for start in range(0, flat.numel(), _CHUNK):
        if ties == 0:
            break
        equal = (keys[start : start + _CHUNK] == threshold).nonzero().flatten()[:ties]
        keep[start + equal] = False
        ties -= len(equal)
    return keep.reshape(scores.shape)


def nm_keep_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns (C_in % m == 0); rows in chunks."""
    rows, cols = scores.shape
    keep = torch.zeros(rows, cols // pattern.m, pattern.m, dtype=torch.bool, device=scores.device)
    step = _row_chunks(rows, cols).step
    for start in _row_chunks(rows, cols):
        groups = scores[start : start + step].float().reshape(-1, cols // pattern.m, pattern.m)
        keep[start : start + step].scatter_(2, groups.topk(pattern.n, dim=2, sorted=False).indices, True)
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
        zeros[index] = zeros.get(index, 0) + int(torch.count_nonzero(linear.weight == 0))
        sizes[index] = sizes.get(index, 0) + linear.weight.numel()
    overall = sum(zeros.values()) / max(sum(sizes.values()), 1)
    return {"overall": overall, "per_layer": [zeros[i] / sizes[i] for i in sorted(sizes)]}
