"""Accuracy-based relevance (002 §4.2, Eq. 3; protocol of App. C.1).

relevance(l) = 1 − max(acc(f − l) − r, 0) / max(acc(f) − r, 0), r = random-chance accuracy.

- Multiple-choice items: lm-eval ``acc_norm`` — each choice's continuation log-likelihood
  divided by its length in characters, the highest wins; r = mean of 1/#choices.
- Token blocks (plain text such as C4 / WikiText): top-1 next-token accuracy on the last
  token of each block; r = 0.

With few items, accuracy moves in coarse steps and many layers tie (often at 0: removing them
changes no answer); selection would then remove the lowest index. Ties are broken by block
influence (BI, :func:`lightning_prune.importance.block_influence.batches_influence`) on the
same data's text (the blocks themselves, or each item's context + gold continuation): a term
smaller than a tenth of the gap between distinct relevance values is added, so the order of
distinct values is kept and tied layers are ordered by BI. A warning names the tie when it
covers more than a third of the candidates.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.data.tasks import EncodedItem, chance_accuracy
from lightning_prune.errors import InputError
from lightning_prune.importance.base import ScoringOptions, batches_of, evaluating, removal_outputs
from lightning_prune.importance.block_influence import batches_influence
from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "accuracy",
    "AccuracyData",
    "accuracy_data",
    "full_accuracy",
    "relevance_from_accuracy",
    "largest_tie",
    "break_ties",
]


@dataclass
class AccuracyData:
    """Batches to run, positions to keep, how to count correct answers, chance r, number of instances.

    ``texts`` are unpadded token batches (B, T) of the same data for the tie-breaking block
    influence (empty: no tie-break).
    """

    batches: list[torch.Tensor]
    select: Callable[[torch.Tensor, int], torch.Tensor]
    correct: Callable[[torch.Tensor, int], float]
    chance: float
    count: float
    texts: list[torch.Tensor] = field(default_factory=list)


def _choice_batch(item: EncodedItem) -> torch.Tensor:
    """(C, T) ids: context + continuation per choice, right-padded (causal, so padding is inert)."""
    rows = [torch.cat([item.context, c]) for c in item.continuations]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _multiple_choice(items: list[EncodedItem]) -> AccuracyData:
    if any(len(item.context) == 0 for item in items):
        raise InputError("a multiple-choice item has an empty query; every item needs a context to score choices")
    longest = [max(len(c) for c in item.continuations) for item in items]

    def select(hidden: torch.Tensor, b: int) -> torch.Tensor:
        start = len(items[b].context) - 1
        return hidden[:, start : start + longest[b]]

    def correct(logits: torch.Tensor, b: int) -> float:
        item = items[b]
        logprobs = torch.log_softmax(logits, dim=-1)
        totals = torch.stack(
            [logprobs[c, : len(cont)].gather(-1, cont.to(logits.device)[:, None]).sum() for c, cont in enumerate(item.continuations)]
        )
        normalised = totals / torch.tensor(item.choice_chars, dtype=torch.float32, device=totals.device)
        return float(int(normalised.argmax()) == item.gold)

    texts = [torch.cat([item.context, item.continuations[item.gold]])[None] for item in items]
    return AccuracyData([_choice_batch(item) for item in items], select, correct, chance_accuracy(items), float(len(items)), texts)


def _last_token(blocks: torch.Tensor, batch_size: int) -> AccuracyData:
    batches = batches_of(blocks, batch_size)

    def correct(logits: torch.Tensor, b: int) -> float:
        return float((logits[:, 0].argmax(-1).cpu() == batches[b][:, -1]).sum())

    return AccuracyData(batches, lambda hidden, b: hidden[:, -2:-1], correct, 0.0, float(len(blocks)), batches)


def accuracy_data(data, batch_size: int) -> AccuracyData:
    """Dispatch on data: encoded multiple-choice items or token blocks (N, T)."""
    if isinstance(data, torch.Tensor) and data.dim() == 2 and len(data) and data.shape[1] >= 2:
        return _last_token(data, batch_size)
    if isinstance(data, list) and data and all(isinstance(item, EncodedItem) for item in data):
        if any(not item.continuations for item in data):
            raise InputError("accuracy metric needs items with at least one choice; a task item has empty choices")
        return _multiple_choice(data)
    raise InputError("accuracy metric needs token blocks (N, T>=2) or encoded multiple-choice items")


@torch.no_grad()
def full_accuracy(model: nn.Module, prepared: AccuracyData, options: ScoringOptions) -> float:
    """Accuracy of the current model (all layers), reduced over ranks."""
    device = next(model.parameters()).device
    correct = 0.0
    with evaluating(model):
        for b, batch in enumerate(prepared.batches):
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            correct += prepared.correct(prepared.select(logits, b).float(), b)
    totals = options.reduce(torch.tensor([correct, prepared.count], dtype=torch.float64))
    return float(totals[0] / totals[1])


def relevance_from_accuracy(accuracies: torch.Tensor, full: float, chance: float) -> torch.Tensor:
    """Eq. 3 on a vector of accuracies without each layer; refuses a full model at or below chance."""
    if full <= chance:
        raise InputError(f"full-model accuracy {full:.4f} is not above chance {chance:.4f}; accuracy relevance is undefined (002 Eq. 3)")
    return (1 - torch.clamp(accuracies - chance, min=0) / (full - chance)).float()


def largest_tie(values: torch.Tensor) -> int:
    """Size of the largest group of exactly equal values (0 for an empty tensor)."""
    return int(torch.unique(values, return_counts=True)[1].max()) if len(values) else 0


def break_ties(relevance: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Order equal ``relevance`` values by ``secondary`` without reordering distinct ones.

    Adds ``w · (secondary − min) / (max − min)`` with ``w`` a tenth of the smallest gap
    between distinct relevance values (0.1 when all are equal), so a lower secondary score
    is removed first among tied layers.

    Args:
        relevance: scores of the candidate layers, shape (K,).
        secondary: tie-break scores of the same layers (higher = more important), shape (K,).

    Returns:
        fp32 scores, shape (K,).
    """
    distinct = torch.unique(relevance.double())
    gap = float((distinct[1:] - distinct[:-1]).min()) if len(distinct) > 1 else 1.0
    spread = secondary.double() - secondary.double().min()
    if float(spread.max()) == 0.0:
        return relevance.float()
    return (relevance.double() + 0.1 * gap * spread / spread.max()).float()


def _warn_on_ties(relevance: torch.Tensor, count: float) -> None:
    tied = largest_tie(relevance)
    if tied > len(relevance) / 3:
        warnings.warn(
            f"accuracy relevance ties for {tied} of {len(relevance)} candidate layers on {count:g} items; the tie is "
            "broken by block influence on the same data, but more items (samples) give a ranking by accuracy",
            stacklevel=3,
        )


def accuracy(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """Accuracy-based relevance of each candidate layer (Eq. 3); higher = more relevant.

    Ties between candidates (common with few items) are broken by block influence on the
    same data (see the module docstring) and warned about when they cover more than a third
    of the candidates.

    Returns:
        fp32 scores, shape (num_layers,); ``nan`` for layers that are not candidates.
    """
    prepared = accuracy_data(data, options.batch_size)
    full = full_accuracy(model, prepared, options)
    num_layers = Anatomy(model).num_layers
    correct = torch.zeros(num_layers, dtype=torch.float64)
    with evaluating(model):
        for j, b, logits in removal_outputs(model, prepared.batches, options, prepared.select, desc="removal accuracy"):
            correct[j] += prepared.correct(logits, b)
    total = float(options.reduce(torch.tensor(prepared.count, dtype=torch.float64)))
    relevance = relevance_from_accuracy(options.reduce(correct) / total, full, prepared.chance)
    positions = options.positions(num_layers)
    _warn_on_ties(relevance[positions], total)
    scores = torch.full((num_layers,), float("nan"))
    if largest_tie(relevance[positions]) > 1 and prepared.texts:
        secondary = batches_influence(model, prepared.texts, 1, options)
        scores[positions] = break_ties(relevance[positions], secondary[positions])
    else:
        scores[positions] = relevance[positions]
    return scores
