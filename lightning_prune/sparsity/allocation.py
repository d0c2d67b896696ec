"""Per-layer sparsity from layer statistics: uniform, OWL and DLP.

Both non-uniform rules score each decoder layer from the Wanda scores ``A_ij = |W_ij|·‖X_j‖``
(003 Eq. 3; Algorithm 1 line 4 — OWL's reference code does the same) of all its projections
together, one sparsity per decoder layer (003 App. C: "per layer" beats "per block"):

- ``dlp`` (003 Eq. 5–6, Algorithm 1): unimportance ``S_l`` = a central statistic of the layer's
  scores, ``dlp_statistic="median"`` by default (the paper's choice, §3.3 and Table 1) or
  ``"mean"`` (what the authors' released code computes for unstructured DLP); importance
  ``I_l = 1 − S_l / Σ_k S_k``.
- ``owl`` (Yin et al. 2024): outlier ratio ``D_l`` = share of scores above ``M`` × their mean
  (003 Eq. 4; ``owl_m``, default M = 5 as in OWL's code; 003 §3.3 uses 7 for LLaMA1-13B).

The statistic ``v_l`` (I_l or D_l) is rescaled to ``d_l = (v_l − min v)/(max v − min v)·2α`` and
``sparsity_l = p + mean(d) − d_l``: more important layers are pruned less and the mean is
exactly ``p`` (all decoder layers have the same number of weights, so the global sparsity is
``p`` too). OWL's λ plays the role of α.

Default α (:func:`default_alpha`): DLP takes 003 App. G Table 19 (α per target sparsity, the
nearest tabulated sparsity), OWL its λ = 0.08; either is clamped so ``[p − α, p + α]`` stays in
``[0, 1)``. Mixed N:M (003 App. E.2, no α given there) defaults to ``0.6/M`` for both.
"""

import torch

from lightning_prune.errors import InputError
from lightning_prune.sparsity.masks import NMPattern

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_ALPHA",
    "DLP_ALPHA_TABLE",
    "DLP_STATISTICS",
    "MIXED_NM_SPREAD",
    "OWL_OUTLIER_MULTIPLE",
    "allocate",
    "check_allocation",
    "check_statistic_options",
    "default_alpha",
    "layer_statistic",
]

ALLOCATIONS = ("uniform", "owl", "dlp")
#: Flat defaults, kept for reference: OWL's λ, and the α of DLP's released scripts (70 % runs).
#: :func:`check_allocation` uses :func:`default_alpha`, which takes DLP's α from the table below.
DEFAULT_ALPHA = {"uniform": None, "owl": 0.08, "dlp": 0.15}
#: 003 App. G, Table 19: DLP's α per target sparsity (LLaMA models).
DLP_ALPHA_TABLE = {0.1: 0.06, 0.2: 0.02, 0.3: 0.04, 0.4: 0.02, 0.5: 0.04, 0.6: 0.10, 0.7: 0.15, 0.8: 0.12}
DLP_STATISTICS = ("median", "mean")
OWL_OUTLIER_MULTIPLE = 5.0
#: Mixed N:M default α = MIXED_NM_SPREAD / M (0.15 for 2:4, 0.075 for 4:8): the raw per-layer
#: ``M·(1 − sparsity_l)`` then spans 2·0.6 = 1.2 > 1, so N always varies (it cannot for α ≤ 0.5/M),
#: and stays within N−1..N+1 whenever the mean of the min-max-scaled statistic is in (1/6, 5/6].
MIXED_NM_SPREAD = 0.6
_EDGE = 1e-3


def _table_alpha(sparsity: float) -> float:
    """α of the nearest sparsity in :data:`DLP_ALPHA_TABLE` (ties: the smaller α)."""
    return min(DLP_ALPHA_TABLE.items(), key=lambda item: (round(abs(item[0] - sparsity), 9), item[1]))[1]


def default_alpha(allocation: str, sparsity: float, pattern: NMPattern | None = None) -> float | None:
    """The α used when none is given (``None`` for uniform).

    - mixed N:M (``pattern`` given): ``0.6 / M`` (:data:`MIXED_NM_SPREAD`), so that per-layer
      ``N_l`` varies and, for usual layer statistics, takes the values N−1, N, N+1 (003 App. E.2
      gives no α for Table 15; OWL's λ = 0.08 and DLP's 50 % α = 0.04 both leave every layer
      at 2:4, an error);
    - dlp: 003 App. G Table 19 at the nearest tabulated sparsity (e.g. 0.04 at 50 %, 0.15 at 70 %);
    - owl: OWL's λ = 0.08.

    Unstructured defaults are clamped to ``min(α, p, 1 − p − 0.001)`` so the nominal range
    ``[p − α, p + α]`` stays inside ``[0, 1)``.
    """
    if allocation == "uniform":
        return None
    if pattern is not None:
        return MIXED_NM_SPREAD / pattern.m
    alpha = _table_alpha(sparsity) if allocation == "dlp" else DEFAULT_ALPHA[allocation]
    return min(alpha, sparsity, 1.0 - sparsity - _EDGE)


def check_statistic_options(dlp_statistic: str, owl_m: float) -> None:
    """Raise :class:`InputError` unless ``dlp_statistic`` is median/mean and ``owl_m`` > 0."""
    if dlp_statistic not in DLP_STATISTICS:
        raise InputError(f"dlp_statistic={dlp_statistic!r} is not known; choose 'median' (003 Eq. 5) or 'mean' (DLP's released code)")
    if not owl_m > 0:
        raise InputError(f"owl_m={owl_m} must be > 0; OWL uses 5 (003 §3.3 also tries 7)")


def check_allocation(
    allocation: str,
    sparsity: float,
    alpha: float | None,
    *,
    pattern: NMPattern | None = None,
    dlp_statistic: str = "median",
    owl_m: float = OWL_OUTLIER_MULTIPLE,
) -> float | None:
    """Validate the settings before any work; return the α to use (:func:`default_alpha` if ``None``).

    The nominal per-layer range ``[p − α, p + α]`` (003 §3.4) must lie inside ``[0, 1)``.

    Args:
        allocation: uniform, owl or dlp.
        sparsity: target p in [0, 1).
        alpha: DLP's α / OWL's λ, or ``None`` for the default.
        pattern: the N:M pattern when the run is N:M; with owl/dlp it is mixed N:M and the
            default α is ``0.6/M`` (pass it, or 2:4 with the unstructured defaults fails).
        dlp_statistic: median or mean (validated here).
        owl_m: OWL's outlier multiplier M (validated here).

    Raises:
        InputError: naming the bad value and what to choose.
    """
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation {allocation!r} is not known; choose one of {', '.join(ALLOCATIONS)}")
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity={sparsity} is outside [0, 1); give the fraction of weights to prune, e.g. 0.5")
    check_statistic_options(dlp_statistic, owl_m)
    if allocation == "uniform":
        return None
    if alpha is None and sparsity == 0.0:
        raise InputError(f"allocation {allocation!r} needs sparsity > 0 to spread; use allocation uniform")
    alpha = default_alpha(allocation, sparsity, pattern) if alpha is None else float(alpha)
    if not 0.0 < alpha <= 0.5:
        raise InputError(f"alpha={alpha} is outside (0, 0.5]; typical values are 0.05-0.2")
    if sparsity - alpha < 0.0 or sparsity + alpha >= 1.0:
        raise InputError(
            f"alpha={alpha} is too large for sparsity={sparsity}: per-layer sparsity would span "
            f"[{sparsity - alpha:.3g}, {sparsity + alpha:.3g}], outside [0, 1); use alpha <= {min(sparsity, 1 - sparsity) - _EDGE:.3g}"
        )
    return alpha


def layer_statistic(allocation: str, scores: torch.Tensor, *, dlp_statistic: str = "median", owl_m: float = OWL_OUTLIER_MULTIPLE) -> float:
    """The per-layer value an allocation needs from the layer's flattened Wanda scores.

    Args:
        allocation: ``dlp``: unimportance S_l (003 Eq. 5) — the median by default, the mean with
            ``dlp_statistic="mean"``; ``owl``: the outlier ratio D_l (003 Eq. 4).
        scores: the layer's Wanda scores, any shape.
        dlp_statistic: median (the paper) or mean (the authors' released code).
        owl_m: OWL's M: a score is an outlier above ``owl_m`` × the layer's mean score.
    """
    scores = scores.float().flatten()
    if allocation == "dlp":
        return float(scores.median() if dlp_statistic == "median" else scores.double().mean())
    return float((scores > owl_m * scores.mean()).float().mean())


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
