"""Which layers to remove, as pure functions of scores (higher score = more important).

- :func:`one_shot`: the ``count`` lowest-scoring unprotected layers, scored once.
- :func:`iterative`: IterPrune (000 App. E; GradMAP Alg. 1): score the current model, remove
  the lowest layer, re-score the pruned model, repeat. The model is touched only through the
  two callables it is given, so the driver itself stays a pure loop over scores.
- :func:`contiguous_block`: the ``count`` consecutive layers with the lowest block score.

Protection keeps the first and last layers (default 1 and 1); since protected layers are
never removed, the same original layers stay protected at every depth.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lightning_prune.errors import InputError

__all__ = [
    "SELECTIONS",
    "Step",
    "check_selection",
    "protected_positions",
    "removal_count",
    "one_shot",
    "contiguous_block",
    "iterative",
    "score_dict",
]

SELECTIONS = ("one_shot", "iterative", "contiguous")


@dataclass
class Step:
    """One decision: layers removed (original indices, in order) and the scores seen (by original index)."""

    removed: list[int]
    scores: dict[int, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"removed": self.removed, "scores": {str(k): v for k, v in self.scores.items()}}


def check_selection(name: str) -> str:
    """``name`` if it is a known selection, else :class:`InputError` listing them."""
    if name not in SELECTIONS:
        raise InputError(f"unknown selection {name!r}; choose one of {', '.join(SELECTIONS)}")
    return name


def protected_positions(num_layers: int, protect_first: int = 1, protect_last: int = 1) -> list[int]:
    """Positions of the first ``protect_first`` and last ``protect_last`` layers."""
    if protect_first < 0 or protect_last < 0:
        raise InputError(f"protect_first={protect_first} / protect_last={protect_last} must be >= 0")
    return sorted(set(range(min(protect_first, num_layers))) | set(range(max(num_layers - protect_last, 0), num_layers)))


def removal_count(num_layers: int, *, count: int | None = None, ratio: float | None = None, protected: int = 0) -> int:
    """Number of layers to remove from a count or a ratio of the depth (exactly one of them).

    The count must leave more layers than the protected ones: 1 <= count < depth − protected.
    """
    if (count is None) == (ratio is None):
        raise InputError("give exactly one of num_layers or ratio")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise InputError(f"ratio={ratio} is outside (0, 1); give the fraction of layers to remove, e.g. 0.25")
        count = max(1, round(ratio * num_layers))
    limit = num_layers - protected - 1
    if limit < 1:
        raise InputError(
            f"the model has {num_layers} layers and {protected} are protected, leaving none to remove; "
            "lower --protect_first / --protect_last"
        )
    if not 1 <= count <= limit:
        raise InputError(f"num_layers={count} must be in 1..{limit}: the model has {num_layers} layers of which {protected} are protected")
    return count


def _ordered(scores: torch.Tensor, protected: Sequence[int]) -> list[int]:
    """Unprotected positions by ascending score (nan last), ties broken by position."""
    values = [math.inf if math.isnan(v) else v for v in scores.tolist()]
    return sorted((i for i in range(len(values)) if i not in set(protected)), key=lambda i: (values[i], i))


def one_shot(scores: torch.Tensor, count: int, protected: Sequence[int] = ()) -> list[int]:
    """The ``count`` lowest-scoring unprotected positions, lowest first (removal order)."""
    order = _ordered(scores, protected)
    if count > len(order):
        raise InputError(f"cannot remove {count} layers: only {len(order)} are unprotected")
    return order[:count]


def contiguous_block(scores: torch.Tensor, count: int, protected: Sequence[int] = (), *, by_start: bool = False) -> list[int]:
    """The block [s, s + count) with the lowest score that contains no protected position.

    Args:
        scores: (num_layers,). Per-layer scores (summed over each window), or, with
            ``by_start``, already one score per block start (the ``contiguous`` metric).
        count: block length.
        protected: positions the block must avoid.
    """
    values = torch.nan_to_num(scores.double(), nan=math.inf)
    starts = [s for s in range(len(scores) - count + 1) if not set(range(s, s + count)) & set(protected)]
    if not starts:
        raise InputError(f"no block of {count} consecutive unprotected layers in a {len(scores)}-layer model")
    window = (lambda s: float(values[s])) if by_start else (lambda s: float(values[s : s + count].sum()))
    best = min(starts, key=lambda s: (window(s), s))
    return list(range(best, best + count))


def score_dict(scores: torch.Tensor, original: Sequence[int]) -> dict[int, float | None]:
    """Scores keyed by original layer index (``None`` for unscored layers)."""
    return {original[i]: (None if math.isnan(v) else v) for i, v in enumerate(scores.tolist())}


def iterative(
    score: Callable[[list[int]], torch.Tensor],
    remove: Callable[[int], None],
    count: int,
    num_layers: int,
    protect_first: int = 1,
    protect_last: int = 1,
) -> list[Step]:
    """IterPrune: ``count`` rounds of score → remove the lowest → re-score the smaller model.

    Args:
        score: given the candidate positions of the current model, returns (current depth,) scores.
        remove: removes the layer at a current position (and compensates, if asked).
        count: layers to remove.
        num_layers: depth before pruning.

    Returns:
        One :class:`Step` per removal, with original indices.
    """
    original = list(range(num_layers))
    steps = []
    for _ in range(count):
        protected = protected_positions(len(original), protect_first, protect_last)
        candidates = [p for p in range(len(original)) if p not in protected]
        scores = score(candidates)
        position = one_shot(scores, 1, protected)[0]
        steps.append(Step([original[position]], score_dict(scores, original)))
        remove(position)
        del original[position]
    return steps
