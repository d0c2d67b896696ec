"""SparseGPT (Frantar & Alistarh 2023): prune with Optimal-Brain-Surgeon weight updates.

Columns are processed left to right in blocks of ``blocksize`` (lazy batch updates). Inside
a block the mask is chosen from ``w² / [U]_jj²`` (U = upper Cholesky factor of H⁻¹, 003
Eq. 2), then each pruned weight's error is spread over the not-yet-processed columns of its
row. Unstructured masks follow one of two rules (``mask_rule``):

- ``"block"`` (default, the reference implementation's rule): one threshold over the whole
  block, all rows together — the block's lowest scores are pruned wherever they fall, so rows
  may end up with different counts. Each block prunes its share of the matrix total (cumulative
  rounding over columns), so the matrix total is exact; the reference instead prunes every score
  ``<=`` the ``int(numel·p)``-th smallest, one weight (plus ties) more per block.
- ``"row"``: every row gets its exact count (:func:`row_counts`), split over the blocks by
  cumulative rounding; each block takes the row's lowest scores.

N:M masks are chosen per group of ``m`` columns as in the original. :func:`reconstruction_error`
measures the layer-wise objective ``‖ΔW X‖² / ‖W X‖²`` (003 Eq. 1) from the Hessian.
"""

import torch

from lightning_prune.errors import InputError
from lightning_prune.sparsity.masks import NMPattern, flat_keep_mask, nm_keep_mask, topk_keep_mask

__all__ = [
    "MASK_RULES",
    "check_mask_rule",
    "inverse_hessian_factor",
    "reconstruction_error",
    "sparsegpt_prune",
]

MASK_RULES = ("block", "row")


def check_mask_rule(mask_rule: str) -> None:
    """Raise :class:`InputError` unless ``mask_rule`` is one of :data:`MASK_RULES`."""
    if mask_rule not in MASK_RULES:
        raise InputError(
            f"mask_rule={mask_rule!r} is not known; choose 'block' (one threshold per column block, "
            "as the SparseGPT reference) or 'row' (exact count per row)"
        )


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, retries: int = 6, *, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = ``percdamp`` · mean diag(H).

    Dead inputs (zero diagonal) get a unit diagonal. When the factorisation fails the
    dampening is multiplied by 10 and tried again, up to ``retries`` times. Computed in fp64 from
    one copy of ``hessian`` (damped in place), with at most three (C_in × C_in) fp64 matrices alive;
    ``overwrite=True`` damps an fp64 ``hessian`` itself instead of a copy (the caller's own tensor).
    """
    work = hessian if overwrite and hessian.dtype == torch.float64 else hessian.to(torch.float64, copy=True)
    diagonal = torch.diagonal(work)
    diagonal[diagonal == 0] = 1.0
    undamped = diagonal.clone()
    damp = percdamp * float(undamped.mean())
    for _ in range(retries + 1):
        diagonal.copy_(undamped + damp)
        lower, info = torch.linalg.cholesky_ex(work)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower  # at most three (C_in × C_in) fp64 matrices at a time
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return upper.float()
        damp *= 10.0
    raise RuntimeError(f"SparseGPT: Hessian not positive definite even with dampening {damp / 10:.3g}")


def _block_counts(counts: torch.Tensor, start: int, end: int, cols: int) -> torch.Tensor:
    """Share of each count that falls in columns [start, end) (cumulative rounding over columns)."""
    before = (counts * start * 2 + cols) // (2 * cols)
    upto = (counts * end * 2 + cols) // (2 * cols)
    return upto - before


def _unstructured_block_mask(scores: torch.Tensor, counts: torch.Tensor, start: int, end: int, cols: int, mask_rule: str) -> torch.Tensor:
    """Keep mask of one block (rows × width) from its OBS scores ``w² / [U]_jj²``.

    ``"block"``: the block's share of ``counts.sum()`` lowest scores over all rows together
    (the reference's single threshold); ``"row"``: each row's share of its own count.
    """
    if mask_rule == "block":
        total = counts.sum().reshape(1)
        return flat_keep_mask(scores, int(_block_counts(total, start, end, cols)))
    return topk_keep_mask(scores, _block_counts(counts, start, end, cols))


INNER_COLUMNS = 16
"""Columns per inner step of :func:`_prune_block`: each column's error updates only the rest of its
inner step (a rank-1 update), the block's later columns get the whole step's errors at once (a matrix
product). The same updates as one rank-1 update per column over the whole block, in another order of
summation; the rank-1 updates touch at most 16 columns instead of up to ``blocksize``."""


def _prune_block(block: torch.Tensor, factor: torch.Tensor, keep: torch.Tensor, pattern: NMPattern | None):
    """OBS column loop on one block (rows × width), updated in place; returns the pruned block and its errors.

    ``keep`` is the block's mask (filled here group by group for an N:M ``pattern``).
    """
    errors = torch.empty_like(block)
    diagonal = torch.diagonal(factor)
    width = block.shape[1]
    inner = INNER_COLUMNS if pattern is None else pattern.m * max(1, INNER_COLUMNS // pattern.m)  # N:M groups never straddle
    for start in range(0, width, inner):
        end = min(start + inner, width)
        for i in range(start, end):
            if pattern is not None and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                keep[:, group] = nm_keep_mask(block[:, group].square() / diagonal[group].square(), pattern)
            error = block[:, i] * ~keep[:, i] / diagonal[i]  # the pruned weights' OBS errors, 0 where kept
            block[:, i:end].addr_(error, factor[i, i:end], alpha=-1)
            errors[:, i] = error
        if end < width:
            block[:, end:].addmm_(errors[:, start:end], factor[start:end, end:], alpha=-1)
    # a column is final once processed; its kept weights are untouched by their own (zero) errors
    return block * keep, errors


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    *,
    counts: torch.Tensor | None = None,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_rule: str = "block",
    factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (C_out, C_in) and update the kept weights to reconstruct ``W X``.

    Args:
        weight: the layer's weight (not modified).
        hessian: (C_in, C_in) H = 2XᵀX/n (``None`` when ``factor`` is given).
        counts: (C_out,) weights to prune per row (unstructured; the ``"block"`` rule uses only
            their sum, the matrix total); or
        pattern: an N:M pattern (``mask_rule`` is then irrelevant).
        blocksize: columns per lazy-update block (a multiple of ``pattern.m``).
        percdamp: dampening as a fraction of mean diag(H).
        mask_rule: ``"block"`` (default): one threshold per column block over all rows, the
            reference implementation's rule (SparseGPT §3, adaptive mask selection); ``"row"``:
            exact per-row counts.
        factor: :func:`inverse_hessian_factor` of ``hessian`` with ``percdamp``, when already computed
            (linears fed the same inputs share it); ``hessian`` is then not read.

    Returns:
        (new weight in fp32, bool keep mask), both (C_out, C_in).

    Raises:
        InputError: for an unknown ``mask_rule``.
    """
    check_mask_rule(mask_rule)
    rows, cols = weight.shape
    work = weight.detach().float().clone()
    if factor is None:
        if hessian is None:
            raise ValueError("sparsegpt_prune needs the Hessian or its inverse factor")
        factor = inverse_hessian_factor(hessian.to(work.device), percdamp)
    factor = factor.to(work.device)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=work.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, block_factor = work[:, start:end].clone(), factor[start:end, start:end]
        if pattern is None:
            scores = block.square() / torch.diagonal(block_factor).square()[None, :]
            keep[:, start:end] = _unstructured_block_mask(scores, counts, start, end, cols, mask_rule)
        pruned, errors = _prune_block(block, block_factor, keep[:, start:end], pattern)
        work[:, start:end] = pruned
        work[:, end:] -= errors @ factor[start:end, end:]
    return work.masked_fill_(~keep, 0.0), keep  # +0.0 where pruned, as a replay from the kept values gives


@torch.no_grad()
def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer-wise reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, ΔW = new − dense.

    With H = 2XᵀX/n this is ``‖(W − Ŵ) X‖² / ‖W X‖²``, the objective of 003 Eq. 1 relative
    to the dense output energy (0 = exact reconstruction, 1 = as bad as zeroing the layer).

    Args:
        weight: dense (C_out, C_in) weight.
        new_weight: pruned (and possibly updated) weight, same shape.
        hessian: (C_in, C_in) undamped H (any positive scale; it cancels).
    """
    dense = weight.detach().double()
    hessian = hessian.detach().double().to(dense.device)
    delta = new_weight.detach().double().to(dense.device) - dense
    numerator = ((delta @ hessian) * delta).sum()
    denominator = ((dense @ hessian) * dense).sum()
    if denominator > 0:
        return float(numerator / denominator)
    return 0.0 if numerator == 0 else float("inf")
