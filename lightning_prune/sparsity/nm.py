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
from lightning_prune.model.anatomy import family_spec
from lightning_prune.sparsity.allocation import MIXED_NM_SPREAD
from lightning_prune.sparsity.masks import NMPattern, prunable_linears

__all__ = [
    "DEFAULT_SPARSITY",
    "check_mixed",
    "check_widths",
    "config_widths",
    "mixed_patterns",
    "parse_pattern",
    "resolve_sparsity",
]

DEFAULT_SPARSITY = 0.5


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


def resolve_sparsity(sparsity: float | None, pattern: NMPattern | None) -> float:
    """The target sparsity: ``1 − N/M`` for N:M (a different explicit value is an error), else the given one."""
    if pattern is None:
        return DEFAULT_SPARSITY if sparsity is None else float(sparsity)
    if sparsity is not None and abs(float(sparsity) - pattern.sparsity) > 1e-9:
        raise InputError(
            f"sparsity={sparsity} contradicts structure {pattern} (sparsity {pattern.sparsity:g}); leave sparsity unset or make it match"
        )
    return pattern.sparsity


def check_mixed(pattern: NMPattern) -> None:
    """Mixed N:M moves some layers below N and others above it, so it needs ``2 <= N <= M − 2``."""
    if not 2 <= pattern.n <= pattern.m - 2:
        raise InputError(
            f"mixed {pattern} cannot vary N per layer within 1..{pattern.m - 1} while keeping the mean at {pattern.n}; "
            "use allocation uniform or a pattern with 2 <= N <= M-2 (e.g. 2:4, 4:8)"
        )


def config_widths(config) -> dict[str, int]:
    """Input widths of the prunable projections, read from a model config (before loading weights)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    intermediate = getattr(config, family_spec(config).intermediate_size_key)
    return {"q/k/v/gate/up": config.hidden_size, "o_proj": heads * head_dim, "down_proj": intermediate}


def check_widths(model_or_config, pattern: NMPattern) -> None:
    """Every prunable linear's input width (from a model or its config) must be divisible by ``M``."""
    if isinstance(model_or_config, nn.Module):
        widths = {name: linear.in_features for name, linear in prunable_linears(model_or_config)}
    else:
        widths = config_widths(model_or_config)
    for name, width in widths.items():
        if width % pattern.m:
            raise InputError(
                f"structure {pattern} needs input widths divisible by {pattern.m}, but {name} has {width}; choose M dividing {width}"
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
            f"use alpha > {0.5 / pattern.m:.3g} (default {MIXED_NM_SPREAD / pattern.m:.3g}) or allocation uniform"
        )
    return [NMPattern(n, pattern.m) for n in floors]
