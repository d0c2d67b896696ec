"""SparseGPT (Frantar & Alistarh 2023): prune with Optimal-Brain-Surgeon weight updates.

Columns are processed left to right in blocks of ``blocksize`` (lazy batch updates). Inside
a block the mask is chosen from ``w² / [U]_jj²`` (U = upper Cholesky factor of H⁻¹, 003
Eq. 2), then each pruned weight's error is spread over the not-yet-processed columns of its
row. Unstructured masks give every row its exact count: the row's count is split over the
blocks by cumulative rounding and each block takes the row's lowest scores (top-k, never
thresholds). N:M masks are chosen per group of ``m`` columns as in the original.
"""

import torch

from lightning_prune.sparsity.masks import NMPattern, nm_keep_mask, topk_keep_mask

__all__ = ["inverse_hessian_factor", "sparsegpt_prune"]


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = ``percdamp`` · mean diag(H).

    Dead inputs (zero diagonal) get a unit diagonal. When the factorisation fails the
    dampening is multiplied by 10 and tried again, up to ``retries`` times.
    """
    hessian = hessian.clone().double()
    diagonal = torch.diagonal(hessian)
    diagonal[diagonal == 0] = 1.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp * float(diagonal.mean())
    for _ in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper.float()
        damp *= 10.0
    raise RuntimeError(f"SparseGPT: Hessian not positive definite even with dampening {damp / 10:.3g}")


def _block_counts(counts: torch.Tensor, start: int, end: int, cols: int) -> torch.Tensor:
    """Share of each row's prune count that falls in columns [start, end) (cumulative rounding)."""
    before = (counts * start * 2 + cols) // (2 * cols)
    upto = (counts * end * 2 + cols) // (2 * cols)
    return upto - before


def _prune_block(block: torch.Tensor, factor: torch.Tensor, keep: torch.Tensor, pattern: NMPattern | None):
    """OBS column loop on one block (rows × width); returns pruned block and its errors."""
    pruned = torch.zeros_like(block)
    errors = torch.zeros_like(block)
    diagonal = torch.diagonal(factor)
    for i in range(block.shape[1]):
        if pattern is not None and i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            keep[:, group] = nm_keep_mask(block[:, group].square() / diagonal[group].square(), pattern)
        column = block[:, i]
        kept = column * keep[:, i]
        pruned[:, i] = kept
        error = (column - kept) / factor[i, i]
        block[:, i:] -= error[:, None] * factor[i, i:][None, :]
        errors[:, i] = error
    return pruned, errors


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (C_out, C_in) and update the kept weights to reconstruct ``W X``.

    Args:
        weight: the layer's weight (not modified).
        hessian: (C_in, C_in) H = 2XᵀX/n.
        counts: (C_out,) weights to prune per row (unstructured); or
        pattern: an N:M pattern.
        blocksize: columns per lazy-update block (a multiple of ``pattern.m``).
        percdamp: dampening as a fraction of mean diag(H).

    Returns:
        (new weight in fp32, bool keep mask), both (C_out, C_in).
    """
    rows, cols = weight.shape
    work = weight.detach().float().clone()
    factor = inverse_hessian_factor(hessian.to(work.device), percdamp)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=work.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, block_factor = work[:, start:end].clone(), factor[start:end, start:end]
        if pattern is None:
            scores = block.square() / torch.diagonal(block_factor).square()[None, :]
            keep[:, start:end] = topk_keep_mask(scores, _block_counts(counts, start, end, cols))
        pruned, errors = _prune_block(block, block_factor, keep[:, start:end], pattern)
        work[:, start:end] = pruned
        work[:, end:] -= errors @ factor[start:end, end:]
    return work * keep, keep
