"""Per-layer sparsity from layer statistics: uniform, OWL and DLP.

Both non-uniform rules score each decoder layer from the Wanda scores ``A_ij = |W_ij|·‖X_j‖``
(003 Eq. 3; Algorithm 1 line 4 — OWL's reference code does the same) of all its projections
together, one sparsity per decoder layer (003 App. C: "per layer" beats "per block"):

- ``dlp`` (003 Eq. 5–6, Algorithm 1): unimportance ``S_l`` = median of the layer's scores
  (the paper's choice, Table 1); importance ``I_l = 1 − S_l / Σ_k S_k``.
- ``owl`` (Yin et al. 2024): outlier ratio ``D_l`` = share of scores above ``M`` × their mean
  (003 Eq. 4, M = 5).

The statistic ``v_l`` (I_l or D_l) is rescaled to ``d_l = (v_l − min v)/(max v − min v)·2α`` and
``sparsity_l = p + mean(d) − d_l``: more important layers are pruned less and the mean is
exactly ``p`` (all decoder layers have the same number of weights, so the global sparsity is
``p`` too). OWL's λ plays the role of α.
"""

import torch

from lightning_prune.errors import InputError

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_ALPHA",
    "OWL_OUTLIER_MULTIPLE",
    "check_allocation",
    "layer_statistic",
    "allocate",
]

ALLOCATIONS = ("uniform", "owl", "dlp")
DEFAULT_ALPHA = {"uniform": None, "owl": 0.08, "dlp": 0.15}
OWL_OUTLIER_MULTIPLE = 5.0


def check_allocation(allocation: str, sparsity: float, alpha: float | None) -> float | None:
    """Validate the settings before any work; return the α to use (the default if ``None``).

    The nominal per-layer range ``[p − α, p + α]`` (003 §3.4) must lie inside ``[0, 1)``.
    """
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation {allocation!r} is not known; choose one of {', '.join(ALLOCATIONS)}")
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity={sparsity} is outside [0, 1); give the fraction of weights to prune, e.g. 0.5")
    if allocation == "uniform":
        return None
    alpha = DEFAULT_ALPHA[allocation] if alpha is None else float(alpha)
    if not 0.0 < alpha <= 0.5:
        raise InputError(f"alpha={alpha} is outside (0, 0.5]; typical values are 0.05-0.2")
    if sparsity - alpha < 0.0 or sparsity + alpha >= 1.0:
        raise InputError(
            f"alpha={alpha} is too large for sparsity={sparsity}: per-layer sparsity would span "
            f"[{sparsity - alpha:.3g}, {sparsity + alpha:.3g}], outside [0, 1); use alpha <= {min(sparsity, 1 - sparsity) - 1e-3:.3g}"
        )
    return alpha


def layer_statistic(allocation: str, scores: torch.Tensor) -> float:
    """The per-layer value an allocation needs from the layer's flattened Wanda scores.

    ``dlp``: the median (unimportance S_l, Eq. 5); ``owl``: the outlier ratio D_l (Eq. 4).
    """
    scores = scores.float().flatten()
    if allocation == "dlp":
        return float(scores.median())
    return float((scores > OWL_OUTLIER_MULTIPLE * scores.mean()).float().mean())


def _spread(values: torch.Tensor, sparsity: float, alpha: float) -> torch.Tensor:
    """``p + mean(d) − d`` with ``d`` = values rescaled to [0, 2α] (Algorithm 1 lines 7–15)."""
    span = values.max() - values.min()
    scaled = (values - values.min()) / span * 2 * alpha if span > 0 else torch.zeros_like(values)
    return sparsity + scaled.mean() - scaled


def allocate(allocation: str, statistics: list[float] | None, sparsity: float, alpha: float | None) -> list[float]:
    """Per-layer sparsity (one per decoder layer) averaging to ``sparsity``.

    Args:
        allocation: uniform, owl or dlp.
        statistics: per layer, :func:`layer_statistic` (ignored for uniform).
        sparsity: target p in [0, 1).
        alpha: DLP's α / OWL's λ (half the range of per-layer sparsities).

    Raises:
        InputError: if a layer's sparsity would leave [0, 1).
    """
    if allocation == "uniform":
        return [float(sparsity)] * len(statistics or [])
    values = torch.tensor(statistics, dtype=torch.float64)
    if allocation == "dlp":
        values = 1.0 - values / values.sum()
    result = _spread(values, sparsity, alpha)
    if result.min() < 0 or result.max() >= 1:
        raise InputError(
            f"alpha={alpha} is too large for sparsity={sparsity}: layer sparsities span "
            f"[{float(result.min()):.3f}, {float(result.max()):.3f}], outside [0, 1); choose a smaller alpha"
        )
    return [float(value) for value in result]
