"""Layer merging: CoMe concatenation merge, CoMe-P grid, sum-merge baseline (paper 004)."""

from lightning_prune.merging.come import (
    MERGE_FAMILIES,
    MERGE_PARTS,
    NORM_RULES,
    check_merge_options,
    check_merge_support,
    check_norm_options,
    concat_merge,
    retention_ratios,
    sum_merge,
    unit_counts,
)
from lightning_prune.merging.methods import MERGE_METHODS, check_merge_request, merge_model
from lightning_prune.merging.posterior import posterior_ratios
from lightning_prune.merging.progressive import (
    MappedLayer,
    MergeRecord,
    heuristic_ratios,
    layer_mapping,
    progressive_merge,
    rebuild_merged_architecture,
)
from lightning_prune.merging.statistics import LayerStatistics, calibration_statistics

__all__ = [
    "MERGE_FAMILIES",
    "MERGE_METHODS",
    "MERGE_PARTS",
    "NORM_RULES",
    "LayerStatistics",
    "MappedLayer",
    "MergeRecord",
    "calibration_statistics",
    "check_merge_options",
    "check_merge_request",
    "check_merge_support",
    "check_norm_options",
    "concat_merge",
    "heuristic_ratios",
    "layer_mapping",
    "merge_model",
    "posterior_ratios",
    "progressive_merge",
    "rebuild_merged_architecture",
    "retention_ratios",
    "sum_merge",
    "unit_counts",
]
