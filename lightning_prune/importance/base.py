"""What every importance metric shares: options, batching, cross-rank reduction, removal replay.

A metric is a function ``metric(model, data, options) -> scores`` returning one fp32 score
per current decoder layer, shape (num_layers,); **higher means more important**, so selection
removes the lowest. Layers that were not scored (not in ``options.candidates``) get ``nan``.
``data`` is a tensor of token blocks (N, T) for every metric; ``accuracy`` also accepts
encoded multiple-choice items (:class:`lightning_prune.data.tasks.EncodedItem`).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import capture_layer_inputs, run_layers
from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "ScoringOptions",
    "identity_reduce",
    "batches_of",
    "check_blocks",
    "evaluating",
    "without_layers",
    "removal_outputs",
    "trainable_layers",
]


def identity_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Single-process reduction: the local sum is the global sum."""
    return tensor


@dataclass
class ScoringOptions:
    """Settings shared by all metrics.

    Attributes:
        batch_size: blocks per forward pass (and per gradient sample for ``gradient``).
        seed: seed of ``random`` (combined with the current depth).
        block_size: number of consecutive layers scored together by ``contiguous``.
        candidates: current layer positions worth scoring for removal (``None``: all).
        prefix_reuse: removal-based metrics run the unchanged prefix once (False: naive).
        reduce: sums a float tensor over ranks (DDP); identity in one process.
        progress: show progress bars.
        label: where in a longer run these bars are (e.g. ``removal 3/7``), shown before their own words.
    """

    batch_size: int = 8
    seed: int = 0
    block_size: int = 1
    candidates: Sequence[int] | None = None
    prefix_reuse: bool = True
    reduce: Callable[[torch.Tensor], torch.Tensor] = identity_reduce
    progress: bool = True
    label: str = ""

    def bar(self, what: str) -> str:
        """A progress bar description: ``label · what``."""
        return f"{self.label} · {what}" if self.label else what

    def positions(self, num_layers: int) -> list[int]:
        """Candidate positions, sorted (all layers when unset)."""
        return sorted(range(num_layers) if self.candidates is None else self.candidates)


def check_blocks(data, metric: str) -> torch.Tensor:
    """``data`` must be token blocks (N, T) with N >= 1."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or len(data) == 0:
        raise InputError(f"metric {metric!r} needs calibration token blocks of shape (N, T); got {type(data).__name__}")
    return data


def batches_of(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split blocks (N, T) into consecutive batches of at most ``batch_size`` rows."""
    return list(torch.split(blocks, batch_size))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (no dropout); the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def trainable_layers(model: nn.Module) -> Iterator[list[list[nn.Parameter]]]:
    """Per layer, its parameters with ``requires_grad`` on inside the block (restored after)."""
    params = [list(layer.parameters()) for layer in Anatomy(model).layers]
    flags = [[p.requires_grad for p in group] for group in params]
    for group in params:
        for p in group:
            p.requires_grad_(True)
    try:
        yield params
    finally:
        for group, group_flags in zip(params, flags):
            for p, flag in zip(group, group_flags):
                p.requires_grad_(flag)


@contextmanager
def without_layers(model: nn.Module, skip: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run the model without the layers at ``skip`` (naive path); config lists follow."""
    anatomy, config = Anatomy(model), model.config
    original, types, depth = list(anatomy.layers), getattr(config, "layer_types", None), config.num_hidden_layers
    anatomy.set_layers([layer for i, layer in enumerate(original) if i not in set(skip)])
    config.num_hidden_layers = len(anatomy.layers)
    if isinstance(types, list):
        config.layer_types = [kind for i, kind in enumerate(types) if i not in set(skip)]
    try:
        yield model
    finally:
        anatomy.set_layers(original)
        config.num_hidden_layers = depth
        if isinstance(types, list):
            config.layer_types = types


SelectPositions = Callable[[torch.Tensor, int], torch.Tensor]


def _all_positions(tensor: torch.Tensor, batch_index: int) -> torch.Tensor:
    return tensor


@torch.no_grad()
def removal_outputs(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    options: ScoringOptions,
    select: SelectPositions = _all_positions,
    desc: str = "removal",
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For each batch ``b`` and candidate ``j``: fp32 logits of the model without layer ``j``.

    With ``options.prefix_reuse`` the hidden states entering the first candidate are captured
    once per batch (:func:`capture_layer_inputs`); walking down the stack, the full model's
    hidden state entering each candidate ``j`` is exactly what the model without ``j`` feeds
    to layer ``j + 1``, so only the suffix ``j + 1 ..`` runs per candidate. Otherwise the whole
    model runs per candidate (the naive reference). ``select(tensor, b)`` slices the positions
    needed (dim 1) before the LM head, so logits are (B, T', V).

    Yields:
        ``(j, b, logits)`` for every batch and candidate.
    """
    anatomy = Anatomy(model)
    candidates = options.positions(anatomy.num_layers)
    device = next(model.parameters()).device
    for b, batch in enumerate(tqdm(batches, desc=options.bar(desc), disable=not options.progress, leave=False)):
        if not options.prefix_reuse:
            for j in candidates:
                with without_layers(model, [j]):
                    logits = model(input_ids=batch.to(device), use_cache=False).logits
                yield j, b, select(logits, b).float()
            continue
        inputs = capture_layer_inputs(model, [batch], candidates[0])
        hidden, kwargs = inputs.hidden[0].to(device), inputs.kwargs[0]
        for position in range(candidates[0], candidates[-1] + 1):
            if position in candidates:
                output = run_layers(model, hidden, kwargs, range(position + 1, anatomy.num_layers))
                yield position, b, anatomy.head(select(output, b)).float()
            hidden = run_layers(model, hidden, kwargs, [position])
