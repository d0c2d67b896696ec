"""N:M semi-structured sparsity: parsing, width checks and DLP's mixed-N:M allocation.

``N:M`` keeps ``N`` of every ``M`` consecutive input weights of a row (N = non-zeros, as in
003 Table 15). The mixed variant (003 App. E.2) gives each decoder layer its own ``N_l``
from the layer's allocated sparsity while keeping the total number of kept weights
unchanged: ``N_l`` is ``M·(1 − sparsity_l)`` rounded by largest remainders so that
``Σ N_l = L·N``.
"""

import math

from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.sparsity.masks import NMPattern, prunable_linears

__all__ = ["parse_pattern", "check_widths", "mixed_patterns"]


def parse_pattern(text: str | None) -> NMPattern | None:
    """``"2:4"`` → ``NMPattern(2, 4)``; empty or ``None`` → ``None`` (unstructured)."""
    if not text:
        return None
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError as error:
        raise InputError(f"structure {text!r} is not N:M such as 2:4 or 4:8") from error
    if not 1 <= n < m:
        raise InputError(f"structure {text!r} needs 1 <= N < M (N kept of every M weights), e.g. 2:4 or 4:8")
    return NMPattern(n, m)


def check_widths(model: nn.Module, pattern: NMPattern) -> None:
    """Every prunable linear's input width must be divisible by ``M``."""
    for name, linear in prunable_linears(model):
        if linear.in_features % pattern.m:
            raise InputError(
                f"structure {pattern} needs input widths divisible by {pattern.m}, but {name} has "
                f"{linear.in_features}; choose M dividing {linear.in_features}"
            )


def mixed_patterns(sparsities: list[float], pattern: NMPattern) -> list[NMPattern]:
    """Per-layer ``N_l:M`` from per-layer sparsities averaging to ``1 − N/M``.

    Raises:
        InputError: if a layer would need ``N_l`` outside ``1..M−1`` or every layer rounds to
            ``N`` (the mixed pattern would silently be the uniform one).
    """
    raw = [pattern.m * (1.0 - s) for s in sparsities]
    floors = [math.floor(value + 1e-9) for value in raw]
    remaining = len(raw) * pattern.n - sum(floors)
    by_fraction = sorted(range(len(raw)), key=lambda i: (-(raw[i] - floors[i]), i))
    for i in by_fraction[:remaining]:
        floors[i] += 1
    if min(floors) < 1 or max(floors) > pattern.m - 1:
        raise InputError(
            f"mixed {pattern} would need N from {min(floors)} to {max(floors)} per layer, outside 1..{pattern.m - 1}; "
            "choose a smaller alpha or a larger M"
        )
    if len(set(floors)) == 1 and len(floors) > 1:
        raise InputError(
            f"alpha is too small for mixed {pattern}: every layer rounds to {pattern}; "
            f"use alpha >= {0.5 / pattern.m:.3g} or allocation uniform"
        )
    return [NMPattern(n, pattern.m) for n in floors]
