"""Progressive merging to a target depth, the ``groups`` bookkeeping and the layer mapping P.

Paper 004 Alg. 1 (CoMe) and Alg. 2 (CoMe-P) share this loop; they differ only in how the
retention ratios of the chosen window are picked (a :data:`RatioRule`). Each iteration
recomputes the calibration statistics on the current model, picks the two-layer window with
the smallest SBI (two layers per step, App. B.1; Table 13 shows larger steps are worse),
merges it into one layer at the window's position and records which original layers every
current layer stands for (``groups``). The mapping P pairs each final merged layer ``b``
with ``a = max(groups[b])``, the last original layer it replaces (spec (e)).
"""

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import layer_type
from lightning_prune.errors import InputError
from lightning_prune.merging.come import check_merge_options, check_merge_support, check_norm_options, concat_merge, retention_ratios
from lightning_prune.merging.statistics import LayerStatistics, calibration_statistics
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import replace_layers

__all__ = [
    "MappedLayer",
    "MergeRecord",
    "RatioRule",
    "heuristic_ratios",
    "choose_window",
    "layer_mapping",
    "check_groups",
    "progressive_merge",
    "rebuild_merged_architecture",
]

RatioRule = Callable[[nn.Module, int, LayerStatistics], torch.Tensor]
"""``rule(model, start, stats) -> ratios (2,)`` for the window ``[start, start + 1]`` of the current model."""


@dataclass(frozen=True)
class MappedLayer:
    """One entry of P: student layer ``student`` replaces original layers ``teacher_first..teacher_last``.

    The distillation target is the teacher's output of ``teacher_last`` (H_T^(a)); with teacher
    forcing the student layer's input is the teacher's input of ``teacher_first``.
    """

    student: int
    teacher_first: int
    teacher_last: int


@dataclass
class MergeRecord:
    """Outcome of :func:`progressive_merge`: final groups and one entry per merge step."""

    groups: list[list[int]]
    steps: list[dict] = field(default_factory=list)

    @property
    def mapping(self) -> list[MappedLayer]:
        return layer_mapping(self.groups)

    def to_dict(self) -> dict:
        return {"groups": self.groups, "mapping": [asdict(m) for m in self.mapping], "steps": self.steps}


def heuristic_ratios(p: float = 1.0, rho: float = 0.0) -> RatioRule:
    """CoMe's rule: ratios from the window's block influence with skew ``p`` and minimum ``rho``."""

    def rule(model: nn.Module, start: int, stats: LayerStatistics) -> torch.Tensor:
        return retention_ratios(stats.block_influence[start : start + 2], p, rho)

    return rule


def layer_mapping(groups: Sequence[Sequence[int]]) -> list[MappedLayer]:
    """P: every current layer standing for more than one original layer, shallow to deep."""
    return [MappedLayer(b, min(g), max(g)) for b, g in enumerate(groups) if len(g) > 1]


def choose_window(
    window_influence: torch.Tensor, groups: Sequence[Sequence[int]], remerge: bool, layer_types: Sequence[str] | None = None
) -> int:
    """Start of the two-layer window with the smallest SBI.

    Windows mixing attention types (sliding / full) are excluded, as are windows touching an
    already merged layer when ``remerge`` is off.
    """
    scores = window_influence.clone().float()
    if layer_types is not None:
        for index in range(len(scores)):
            if layer_types[index] != layer_types[index + 1]:
                scores[index] = float("inf")
    if not remerge:
        for index, group in enumerate(groups):
            if len(group) > 1:
                scores[max(index - 1, 0) : index + 1] = float("inf")
    if not torch.isfinite(scores).any():
        raise InputError("no two adjacent layers of one attention type are left to merge; pass remerge true or merge fewer layers")
    return int(scores.argmin())


def check_groups(groups: Sequence[Sequence[int]], depth: int) -> list[list[int]]:
    """Groups must list the original layers 0..N-1 in order, each group contiguous, one per current layer."""
    groups = [[int(i) for i in group] for group in groups]
    flat = [i for group in groups for i in group]
    if not groups or flat != list(range(len(flat))) or any(not g for g in groups):
        raise InputError(f"merge groups {groups} do not list original layers 0..N-1 in order, one contiguous group per layer")
    if len(flat) != depth:
        raise InputError(f"merge groups describe a {len(flat)}-layer original model, but the model has {depth} layers")
    return groups


def progressive_merge(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    target_depth: int,
    *,
    ratio_rule: RatioRule | None = None,
    combine: Callable = concat_merge,
    remerge: bool = True,
    norm_rule: str = "mean",
    parts: str = "both",
    progress: bool = True,
) -> MergeRecord:
    """Merge two adjacent layers at a time until the model has ``target_depth`` layers (Alg. 1 / 2).

    Args:
        model: a supported causal LM, changed in place.
        batches: calibration token ids, each (B, T).
        target_depth: target depth L, in 1..depth-1.
        ratio_rule: picks the window's retention ratios (default: CoMe heuristic, p=1, rho=0).
        combine: ``concat_merge`` (CoMe) or ``sum_merge`` (weight-average baseline).
        remerge: allow a merged layer to be merged again (the authors' ``--wo-repeat`` is ``False``).
        norm_rule: merged layer norms, passed to ``combine`` (``mean``: App. C; see
            :func:`~lightning_prune.merging.come.concat_merge`).
        parts: sublayers concatenated, passed to ``combine`` (``both``: the paper).
        progress: show progress bars.

    Returns:
        :class:`MergeRecord` with groups, mapping and per-step window, ratios, SBI.
    """
    check_merge_support(model)
    anatomy = Anatomy(model)
    check_merge_options(target_depth, anatomy.num_layers, 1.0, 0.0)
    check_norm_options(norm_rule, parts)
    rule = ratio_rule or heuristic_ratios()
    record = MergeRecord(groups=[[i] for i in range(anatomy.num_layers)])
    for _ in tqdm(range(anatomy.num_layers - target_depth), desc="merge", disable=not progress):
        stats = calibration_statistics(model, batches, progress=progress)
        types = [layer_type(model, i) for i in range(len(record.groups))]
        start = choose_window(stats.window_influence, record.groups, remerge, types)
        ratios = rule(model, start, stats)
        window = list(anatomy.layers[start : start + 2])
        sensitivities = (stats.attention[start : start + 2], stats.ffn[start : start + 2])
        merged = combine(model, window, ratios, *sensitivities, norm_rule=norm_rule, parts=parts)
        replace_layers(model, start, start + 2, merged)
        record.steps.append(
            {
                "window": [start, start + 1],
                "original_layers": [record.groups[start], record.groups[start + 1]],
                "ratios": [round(float(r), 6) for r in ratios],
                "window_influence": round(float(stats.window_influence[start]), 6),
                "block_influence": [round(float(b), 6) for b in stats.block_influence[start : start + 2]],
            }
        )
        record.groups[start : start + 2] = [sorted(record.groups[start] + record.groups[start + 1])]
    return record


def rebuild_merged_architecture(model: nn.Module, groups: Sequence[Sequence[int]]) -> None:
    """Give an original model the merged stack described by ``groups`` (weights to be loaded after).

    Each multi-layer group becomes a copy of its first layer (same shapes as every merged layer),
    so a checkpoint's state dict then loads into the right places.
    """
    check_merge_support(model)
    groups = check_groups(groups, Anatomy(model).num_layers)
    layers = Anatomy(model).layers
    for group in reversed(groups):
        if len(group) > 1:
            replace_layers(model, group[0], group[-1] + 1, copy.deepcopy(layers[group[0]]))
