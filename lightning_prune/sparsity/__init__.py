"""Unstructured and N:M weight sparsity with uniform, OWL or DLP per-layer allocation.

- :mod:`.scores`: magnitude and Wanda scores, input statistics; :mod:`.sparsegpt`: SparseGPT
  (reference block-threshold mask by default) and the relative reconstruction error.
- :mod:`.allocation`: uniform / OWL / DLP per-layer sparsity (003 Eq. 5-6, Algorithm 1).
- :mod:`.nm`: N:M patterns and DLP's mixed N:M; :mod:`.masks`: exact-count masks, apply/measure.
- :mod:`.sequential`: the layer-by-layer calibration loop, :func:`sparsify`.
- :mod:`.compressed`: the compressed-tensors export (sparse bitmask formats) and its loader.
"""

from lightning_prune.sparsity.allocation import (
    ALLOCATIONS,
    DEFAULT_ALPHA,
    DLP_ALPHA_TABLE,
    DLP_STATISTICS,
    OWL_OUTLIER_MULTIPLE,
    allocate,
    check_allocation,
    check_statistic_options,
    default_alpha,
    layer_statistic,
)
from lightning_prune.sparsity.masks import (
    NMPattern,
    apply_masks,
    flat_keep_mask,
    mask_gradients,
    masks_from_model,
    measure_sparsity,
    nm_keep_mask,
    prunable_linears,
    row_counts,
    topk_keep_mask,
    unwrap_model,
)
from lightning_prune.sparsity.nm import check_mixed, check_widths, mixed_patterns, parse_pattern, resolve_sparsity
from lightning_prune.sparsity.scores import (
    MAGNITUDE_SCOPES,
    METHODS,
    InputStatistics,
    check_magnitude_scope,
    magnitude_scores,
    wanda_scores,
)
from lightning_prune.sparsity.sequential import (
    SparsityResult,
    allocation_statistics,
    check_method,
    prune_linear,
    sparsify,
)
from lightning_prune.sparsity.sparsegpt import MASK_RULES, check_mask_rule, reconstruction_error, sparsegpt_prune

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_ALPHA",
    "DLP_ALPHA_TABLE",
    "DLP_STATISTICS",
    "MAGNITUDE_SCOPES",
    "MASK_RULES",
    "METHODS",
    "OWL_OUTLIER_MULTIPLE",
    "InputStatistics",
    "NMPattern",
    "SparsityResult",
    "allocate",
    "allocation_statistics",
    "apply_masks",
    "check_allocation",
    "check_magnitude_scope",
    "check_mask_rule",
    "check_method",
    "check_mixed",
    "check_statistic_options",
    "check_widths",
    "default_alpha",
    "flat_keep_mask",
    "layer_statistic",
    "magnitude_scores",
    "mask_gradients",
    "masks_from_model",
    "measure_sparsity",
    "mixed_patterns",
    "nm_keep_mask",
    "parse_pattern",
    "prunable_linears",
    "prune_linear",
    "reconstruction_error",
    "resolve_sparsity",
    "row_counts",
    "sparsegpt_prune",
    "sparsify",
    "topk_keep_mask",
    "unwrap_model",
    "wanda_scores",
]
