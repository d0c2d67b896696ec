"""Score → select → remove (→ compensate): the one pruning routine the CLI and the callback share.

:func:`prune_layers` validates every choice before touching the model, then runs one of the
selections of :mod:`lightning_prune.selection` with a metric of :mod:`lightning_prune.importance`
and a compensation of :mod:`lightning_prune.compensation`, and returns the decision record
(removed layers in original indices and removal order, with the scores seen at each step).
"""

import dataclasses

import torch
from torch import nn

from lightning_prune.compensation import make_compensation
from lightning_prune.errors import InputError
from lightning_prune.importance import DEFAULT_PROTECTION, METRICS, ScoringOptions, metric_name
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import validate_layer_indices
from lightning_prune.selection import (
    Step,
    check_selection,
    contiguous_block,
    iterative,
    one_shot,
    protected_positions,
    removal_count,
    score_dict,
)

__all__ = ["resolve_protection", "prune_layers"]


def resolve_protection(metric: str, protect_first: int | None, protect_last: int | None) -> tuple[int, int]:
    """Protected first/last counts: given values, else the metric's paper default, else (1, 1)."""
    first, last = DEFAULT_PROTECTION.get(metric, (1, 1))
    return (first if protect_first is None else protect_first, last if protect_last is None else protect_last)


def _plan(model, metric, selection, num_layers, ratio, protect, layers, compensation, compensation_options):
    """Validate all choices up front; returns (metric, count, protection, compensation object)."""
    depth = Anatomy(model).num_layers
    comp = make_compensation(compensation, **(compensation_options or {}))
    comp.check(model)
    if layers is not None:
        if num_layers is not None or ratio is not None:
            raise InputError("give exactly one of layers, num_layers or ratio")
        return None, len(validate_layer_indices(layers, depth)), (0, 0), comp
    metric = metric_name(metric)
    check_selection(selection)
    if metric == "contiguous" and selection != "contiguous":
        raise InputError("metric 'contiguous' scores blocks; use it with --selection contiguous")
    first, last = resolve_protection(metric, *protect)
    count = removal_count(depth, count=num_layers, ratio=ratio, protected=len(protected_positions(depth, first, last)))
    return metric, count, (first, last), comp


class _Run:
    """State of one pruning run: the model, its current-to-original index map, compensation records."""

    def __init__(self, model: nn.Module, data, blocks, metric: str | None, comp, options: ScoringOptions):
        self.model, self.data, self.blocks, self.metric, self.comp, self.options = model, data, blocks, metric, comp, options
        self.current = list(range(Anatomy(model).num_layers))
        self.records: list[dict] = []
        self.count = 0  # layers this run removes (set once the target is known)

    def _label(self, action: str) -> None:
        self.options.label = f"removal {len(self.records) + 1}/{self.count} · {action}"

    def score(self, candidates: list[int]) -> torch.Tensor:
        self.options.candidates = candidates
        self._label(f"scoring {len(candidates)} layers")
        return METRICS[self.metric](self.model, self.data, self.options)

    def remove(self, index: int) -> None:
        """Remove (and compensate) the layer with original index ``index``."""
        position = self.current.index(index)
        self._label(f"removing layer {index}")
        self.records.append({"layer": index, **self.comp.remove(self.model, position, self.blocks, self.options)})
        del self.current[position]

    def select(self, selection: str, count: int, first: int, last: int) -> list[Step]:
        """Run the selection; one-shot and contiguous picks are removed here in removal order."""
        depth = len(self.current)
        protected = protected_positions(depth, first, last)
        if selection == "iterative":
            return iterative(self.score, lambda position: self.remove(self.current[position]), count, depth, first, last)
        if self.metric == "contiguous":
            self.options.block_size = count
        scores = self.score([p for p in range(depth) if p not in protected])
        if selection == "contiguous":
            chosen = contiguous_block(scores, count, protected, by_start=self.metric == "contiguous")
        else:
            chosen = one_shot(scores, count, protected)
        for index in chosen:
            self.remove(index)
        return [Step(chosen, score_dict(scores, list(range(depth))))]


def prune_layers(
    model: nn.Module,
    data,
    *,
    metric: str = "block_influence",
    selection: str = "one_shot",
    num_layers: int | None = None,
    ratio: float | None = None,
    compensation: str = "none",
    compensation_options: dict | None = None,
    protect: tuple[int | None, int | None] = (None, None),
    layers: list[int] | None = None,
    calibration_blocks: torch.Tensor | None = None,
    options: ScoringOptions | None = None,
) -> dict:
    """Remove layers from ``model`` in place and return the decision record.

    Args:
        model: a supported causal LM.
        data: scoring data: token blocks (N, T), or encoded multiple-choice items for ``accuracy``.
        metric / selection / compensation: registry names.
        compensation_options: keyword settings of the compensation, e.g. ``{"solver": "adam"}``.
        num_layers / ratio / layers: exactly one target (count, fraction, or explicit original
            indices, removed in the given order).
        protect: (first, last) layers never removed; ``None`` takes the metric's default.
        calibration_blocks: token blocks for compensation (default: ``data``).
        options: scoring options (batch size, seed, prefix reuse, cross-rank reduce); copied.
    """
    options = dataclasses.replace(options or ScoringOptions())
    metric, count, (first, last), comp = _plan(
        model, metric, selection, num_layers, ratio, protect, layers, compensation, compensation_options
    )
    blocks = data if calibration_blocks is None else calibration_blocks
    if comp.name != "none" and not isinstance(blocks, torch.Tensor):
        raise InputError(f"compensation {comp.name!r} needs calibration token blocks")
    anatomy = Anatomy(model)
    tied = anatomy.lm_head.weight is anatomy.embed_tokens.weight
    depth = anatomy.num_layers
    run = _Run(model, data, blocks, metric, comp, options)
    run.count = len(layers) if layers is not None else count
    comp.start(model, blocks, options)
    if layers is not None:
        steps = [Step(list(layers))]
        for index in layers:
            run.remove(index)
    else:
        steps = run.select(selection, count, first, last)
    options.label = f"{comp.name} compensation · final"
    final = comp.finish(model, blocks, list(run.current), options)
    removed = {"removed_layers": [index for step in steps for index in step.removed], "kept_layers": list(run.current)}
    untied = tied and Anatomy(model).lm_head.weight is not Anatomy(model).embed_tokens.weight
    compensated = {"compensation": comp.name, "untied_embeddings": untied, "compensation_steps": run.records, "compensation_final": final}
    if layers is not None:
        return {**removed, **(compensated if comp.name != "none" else {})}
    chosen = {
        "metric": metric,
        "selection": selection,
        "protected_layers": protected_positions(depth, first, last),
        "num_layers_before": depth,
    }
    return {**chosen, **removed, "steps": [step.as_dict() for step in steps], **compensated}
