"""Sequential layer-by-layer sparsification (the Wanda / SparseGPT calibration loop).

1. Capture what enters decoder layer 0 for every calibration batch (hidden states plus
   position embeddings and masks, :func:`capture_layer_inputs`).
2. For OWL / DLP, one pass over the *dense* layers computes each layer's statistic from its
   Wanda scores, and :func:`allocate` turns them into per-layer sparsities.
3. For each layer in order: run it with hooks that collect its projections' input
   statistics, prune every projection (Wanda: per output row, exact counts; magnitude: per row
   or per matrix, ``magnitude_scope``; SparseGPT: per column block or per row, ``mask_rule``),
   then run the *pruned* layer to get the inputs of the next one.

Only one layer's activations are held besides the model (N × T × D hidden states).

Data parallel (``reduce``, a sum over ranks): each rank passes its own shard of the
calibration blocks; every layer's input statistics (Wanda's squared sums, SparseGPT's Gram
matrices, their token counts) are all-reduced as sums before they are used, so the OWL / DLP
statistics, the allocation and the masks are those of all shards together, on every rank.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import LayerInputs, capture_layer_inputs, run_layers
from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.onload import onloaded, return_freed_memory
from lightning_prune.sparsity.allocation import (
    OWL_OUTLIER_MULTIPLE,
    allocate,
    check_allocation,
    check_statistic_options,
    layer_statistic,
)
from lightning_prune.sparsity.masks import (
    NMPattern,
    base_linear,
    flat_keep_mask,
    nm_keep_mask,
    row_counts,
    topk_keep_mask,
    unwrap_model,
)
from lightning_prune.sparsity.nm import check_mixed, check_widths, mixed_patterns
from lightning_prune.sparsity.packing import PackedMasks
from lightning_prune.sparsity.scores import (
    METHODS,
    InputStatistics,
    check_magnitude_scope,
    collect_statistics,
    magnitude_scores,
    wanda_scores,
)
from lightning_prune.sparsity.sparsegpt import check_mask_rule, inverse_hessian_factor, sparsegpt_prune

__all__ = ["SparsityResult", "allocation_statistics", "check_method", "prune_linear", "sparsify"]


@dataclass
class SparsityResult:
    """What :func:`sparsify` decided.

    Attributes:
        layer_sparsity: per decoder layer, the allocated sparsity.
        layer_statistic: per decoder layer, the allocation statistic (DLP median / OWL outlier ratio).
        layer_patterns: per decoder layer, ``"N:M"`` (N:M runs only).
        masks: keep masks keyed ``layers.{i}.{role}`` (bool when read, stored one bit per weight).
        zeros: per decoder layer, the exact zeros of its projections' weights after pruning, and their sizes
            (counted while each layer is on the compute device; :meth:`measured` turns them into fractions).
        kept: SparseGPT only: per projection (keyed as ``masks``), its kept weights after the OBS update, in
            row-major order of the mask (CPU; taken while the layer is on the compute device). With the masks
            they give the pruned weights back, without holding a second full copy of them.
    """

    layer_sparsity: list[float]
    layer_statistic: list[float] | None = None
    layer_patterns: list[str] | None = None
    masks: PackedMasks = field(default_factory=PackedMasks)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)

    def measured(self) -> dict:
        """Fraction of exact zeros over all pruned weights, overall and per layer (as :func:`measure_sparsity`)."""
        total = sum(size for _, size in self.zeros)
        return {"overall": sum(z for z, _ in self.zeros) / max(total, 1), "per_layer": [z / size for z, size in self.zeros]}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"method {method!r} is not known; choose one of {', '.join(METHODS)}")


def _unstructured_keep(scores: torch.Tensor, counts: torch.Tensor, per_matrix: bool) -> torch.Tensor:
    """Exact-count keep mask: each row's count, or their sum over the whole matrix."""
    return flat_keep_mask(scores, int(counts.sum())) if per_matrix else topk_keep_mask(scores, counts)


def prune_linear(
    linear: nn.Module,
    method: str,
    target: float | NMPattern,
    stats: InputStatistics | None,
    *,
    magnitude_scope: str = "row",
    **sparsegpt_options,
) -> torch.Tensor:
    """Prune one linear in place to ``target`` (a sparsity or an N:M pattern); return its keep mask.

    Args:
        linear: the projection (its ``weight`` is changed in place).
        method: magnitude, wanda or sparsegpt.
        target: the layer's sparsity, or its N:M pattern.
        stats: the projection's input statistics (``None`` for magnitude).
        magnitude_scope: unstructured magnitude only: ``"row"`` (exact count per output row) or
            ``"matrix"`` (one threshold over the whole projection, 003's Magnitude baseline).
        **sparsegpt_options: ``blocksize``, ``percdamp``, ``mask_rule``, ``factor`` of :func:`sparsegpt_prune`.
    """
    check_magnitude_scope(magnitude_scope)
    weight = linear.weight
    pattern = target if isinstance(target, NMPattern) else None
    counts = None if pattern else row_counts(*weight.shape, target)
    if method == "sparsegpt":
        hessian = stats.hessian if sparsegpt_options.get("factor") is None else None  # a given factor already holds H
        new_weight, keep = sparsegpt_prune(weight, hessian, counts=counts, pattern=pattern, **sparsegpt_options)
        weight.data.copy_(new_weight.to(weight.dtype))
        return keep
    scores = magnitude_scores(weight) if method == "magnitude" else wanda_scores(weight, stats)
    per_matrix = method == "magnitude" and magnitude_scope == "matrix"
    keep = nm_keep_mask(scores, pattern) if pattern else _unstructured_keep(scores, counts, per_matrix)
    weight.data.mul_(keep.to(weight.dtype))
    return keep


def _run_layer(model, position: int, inputs: LayerInputs) -> list[torch.Tensor]:
    return [run_layers(model, hidden, kwargs, [position]) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]


def _linears(anatomy: Anatomy, position: int) -> dict[str, nn.Module]:
    return {role: base_linear(module) for role, module in anatomy.linears(anatomy.layers[position]).items()}


def _allocation_statistics(
    model, inputs: LayerInputs, allocations, progress: bool, reduce=None, **statistic_options
) -> dict[str, list[float]]:
    """Dense pass: each layer's statistic of its concatenated Wanda scores (003 Algorithm 1 lines 4–5).

    ``statistic_options``: ``dlp_statistic`` / ``owl_m`` of :func:`layer_statistic`.
    """
    anatomy = Anatomy(model)
    values = {allocation: [] for allocation in allocations}
    hidden = inputs.hidden
    for position in tqdm(range(anatomy.num_layers), desc="layer statistics", disable=not progress, leave=False):
        linears = _linears(anatomy, position)
        with collect_statistics(linears, hessian=False, reduce=reduce) as stats:
            hidden = _run_layer(model, position, LayerInputs(position, hidden, inputs.kwargs))
        scores = torch.cat([wanda_scores(linear.weight, stats[role]).flatten() for role, linear in linears.items()])
        for allocation in allocations:
            values[allocation].append(layer_statistic(allocation, scores, **statistic_options))
    return values


@torch.no_grad()
def allocation_statistics(
    model: nn.Module,
    blocks: torch.Tensor,
    allocations=("owl", "dlp"),
    *,
    batch_size: int = 8,
    progress: bool = True,
    dlp_statistic: str = "median",
    owl_m: float = OWL_OUTLIER_MULTIPLE,
) -> dict[str, list[float]]:
    """Per allocation, the per-layer statistics of the dense model (reusable across methods and targets).

    ``dlp_statistic`` (median, 003 Eq. 5; or mean, DLP's released code) and ``owl_m`` (OWL's M,
    003 Eq. 4) are as in :func:`layer_statistic`.
    """
    check_statistic_options(dlp_statistic, owl_m)
    model = unwrap_model(model)
    inputs = capture_layer_inputs(model, blocks.split(batch_size), 0)
    return _allocation_statistics(model, inputs, allocations, progress, dlp_statistic=dlp_statistic, owl_m=owl_m)


def _targets(result: SparsityResult, pattern: NMPattern | None, allocation: str) -> list[float | NMPattern]:
    if pattern is None:
        return result.layer_sparsity
    if allocation == "uniform":
        patterns = [pattern] * len(result.layer_sparsity)
    else:
        patterns = mixed_patterns(result.layer_sparsity, pattern)
    result.layer_patterns = [str(p) for p in patterns]
    result.layer_sparsity = [p.sparsity for p in patterns]
    return patterns


def _shared_factor(factors: list[tuple[InputStatistics, torch.Tensor]], stats: InputStatistics, percdamp: float) -> torch.Tensor:
    """SparseGPT's inverse-Hessian factor, computed once per distinct Hessian of a layer (q/k/v, gate/up share theirs).

    Two linears' Hessians are equal when their Gram sums and token counts are (linears fed the same
    tensor accumulate the same products in the same order, :func:`collect_statistics`).
    """
    for known, factor in factors:
        if known.tokens == stats.tokens and torch.equal(known.gram, stats.gram):
            return factor
    factor = inverse_hessian_factor(stats.hessian, percdamp, overwrite=True)  # stats.hessian is a new tensor
    factors.append((stats, factor))
    return factor


def _prune_layers(model, inputs, method, targets, result: SparsityResult, progress, options, reduce=None) -> None:
    """Prune the layers in order, feeding each pruned layer's outputs to the next."""
    anatomy = Anatomy(model)
    hidden = inputs.hidden if inputs is not None else None
    for position in tqdm(range(anatomy.num_layers), desc=f"{method} pruning", disable=not progress, leave=False):
        onloaded(model, anatomy.layers[position])  # onloaded model: the masks are chosen on the compute device
        linears = _linears(anatomy, position)
        stats = None
        if method != "magnitude":
            layer_inputs = LayerInputs(position, hidden, inputs.kwargs)
            with collect_statistics(linears, hessian=method == "sparsegpt", reduce=reduce) as stats:
                _run_layer(model, position, layer_inputs)
        factors: list[tuple[InputStatistics, torch.Tensor]] = []  # the inverse factor of each distinct input of this layer
        for role, linear in linears.items():
            stat = stats[role] if stats else None
            extra = {"factor": _shared_factor(factors, stat, options["percdamp"])} if method == "sparsegpt" else {}
            name = f"layers.{position}.{role}"
            keep = prune_linear(linear, method, targets[position], stat, **options, **extra)
            result.masks[name] = keep
            if method == "sparsegpt":  # the OBS update changed the kept weights: the decision stores them (only them)
                result.kept[name] = linear.weight.detach()[keep].cpu()
        weights = [linear.weight for linear in linears.values()]
        result.zeros.append((sum(int(torch.count_nonzero(w == 0)) for w in weights), sum(w.numel() for w in weights)))
        if hidden is not None and position + 1 < anatomy.num_layers:
            hidden = _run_layer(model, position, LayerInputs(position, hidden, inputs.kwargs))
        del stats, factors
        return_freed_memory()  # the layer's statistics and temporaries: not kept resident by the allocator


@torch.no_grad()
def sparsify(
    model: nn.Module,
    blocks: torch.Tensor | None,
    *,
    method: str = "wanda",
    allocation: str = "uniform",
    sparsity: float = 0.5,
    alpha: float | None = None,
    pattern: NMPattern | None = None,
    batch_size: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
    statistics: list[float] | None = None,
    progress: bool = True,
    mask_rule: str = "block",
    magnitude_scope: str = "row",
    dlp_statistic: str = "median",
    owl_m: float = OWL_OUTLIER_MULTIPLE,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SparsityResult:
    """Prune every q/k/v/o/gate/up/down projection of the decoder in place.

    Args:
        model: a supported causal LM, possibly peft-wrapped (embeddings and lm_head are left dense).
        blocks: calibration token ids (N, T); ``None`` only for magnitude with uniform allocation.
        method: magnitude, wanda or sparsegpt.
        allocation: uniform, owl or dlp.
        sparsity: target fraction of pruned weights p (ignored when ``pattern`` is given: p = 1 − N/M).
        alpha: DLP's α / OWL's λ (default: :func:`default_alpha` — 003 Table 19 for dlp, 0.08 for
            owl, ``0.6/M`` for mixed N:M).
        pattern: N:M pattern; with owl/dlp each layer gets its own N (mixed N:M).
        batch_size: calibration blocks per forward.
        blocksize / percdamp: SparseGPT's lazy-update block and dampening.
        statistics: precomputed per-layer statistics for owl/dlp (:func:`allocation_statistics`;
            ``dlp_statistic`` and ``owl_m`` then do not apply).
        progress: show progress bars.
        mask_rule: SparseGPT's unstructured mask: ``"block"`` (one threshold per column block,
            the reference implementation) or ``"row"`` (exact count per row).
        magnitude_scope: magnitude's unstructured comparison group: ``"row"`` or ``"matrix"``
            (one threshold per projection — 003's Magnitude baseline).
        dlp_statistic: DLP's layer unimportance S_l: ``"median"`` (003 Eq. 5) or ``"mean"``
            (the authors' released code).
        owl_m: OWL's outlier multiplier M (003 Eq. 4).
        reduce: DDP: sums a tensor over ranks, ``blocks`` being this rank's shard (``None``: one process).
    """
    check_method(method)
    check_mask_rule(mask_rule)
    check_magnitude_scope(magnitude_scope)
    model = unwrap_model(model)
    sparsity = pattern.sparsity if pattern else sparsity
    mixed = pattern if allocation != "uniform" else None
    alpha = check_allocation(allocation, sparsity, alpha, pattern=mixed, dlp_statistic=dlp_statistic, owl_m=owl_m)
    if pattern:
        check_widths(model, pattern)
        if allocation != "uniform":
            check_mixed(pattern)
    needs_data = method != "magnitude" or (allocation != "uniform" and statistics is None)
    if needs_data and blocks is None:
        raise InputError(f"method {method!r} with allocation {allocation!r} needs calibration data")
    was_training = model.training
    model.eval()
    inputs = capture_layer_inputs(model, blocks.split(batch_size), 0) if needs_data else None
    num_layers = Anatomy(model).num_layers
    if allocation == "uniform":
        statistics = None
    elif statistics is None:
        statistic_options = {"dlp_statistic": dlp_statistic, "owl_m": owl_m}
        statistics = _allocation_statistics(model, inputs, [allocation], progress, reduce, **statistic_options)[allocation]
    elif len(statistics) != num_layers:
        raise InputError(f"{len(statistics)} layer statistics given for a model with {num_layers} layers")
    result = SparsityResult(allocate(allocation, statistics or [0.0] * num_layers, sparsity, alpha), statistics)
    targets = _targets(result, pattern, allocation)
    if method == "sparsegpt":
        options = {"blocksize": blocksize, "percdamp": percdamp, "mask_rule": mask_rule}
    else:
        options = {"magnitude_scope": magnitude_scope}
    _prune_layers(model, inputs if method != "magnitude" else None, method, targets, result, progress, options, reduce)
    model.train(was_training)
    return result
