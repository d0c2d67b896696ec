"""Layer importance metrics: one signature ``metric(model, data, options) -> (num_layers,) fp32``.

Higher scores mean more important layers; selection removes the lowest. ``METRICS`` is the
one registry of short names; ``DEFAULT_PROTECTION`` holds the metrics whose paper setting
protects more than the first and last layer (Mag+ / Taylor+: first four, last two).
"""

from lightning_prune.errors import InputError
from lightning_prune.importance.accuracy import accuracy
from lightning_prune.importance.base import ScoringOptions
from lightning_prune.importance.block_influence import block_influence
from lightning_prune.importance.contiguous import contiguous
from lightning_prune.importance.gradient import gradient
from lightning_prune.importance.magnitude import magnitude
from lightning_prune.importance.random import random_scores
from lightning_prune.importance.removal_perplexity import removal_perplexity
from lightning_prune.importance.sbi import sbi
from lightning_prune.importance.taylor import taylor

__all__ = ["METRICS", "ALIASES", "DEFAULT_PROTECTION", "ScoringOptions", "get_metric", "metric_name", "score_layers"]

METRICS = {
    "magnitude": magnitude,
    "taylor": taylor,
    "block_influence": block_influence,
    "contiguous": contiguous,
    "removal_perplexity": removal_perplexity,
    "gradient": gradient,
    "accuracy": accuracy,
    "random": random_scores,
    "sbi": sbi,
}
ALIASES = {"bi": "block_influence", "cl": "contiguous", "ppl": "removal_perplexity", "mag": "magnitude"}
DEFAULT_PROTECTION = {"magnitude": (4, 2), "taylor": (4, 2)}


def metric_name(name: str) -> str:
    """Canonical metric name (aliases resolved), or :class:`InputError` listing the valid ones."""
    canonical = ALIASES.get(name, name)
    if canonical not in METRICS:
        raise InputError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)} (aliases: {', '.join(ALIASES)})")
    return canonical


def get_metric(name: str):
    """The scoring function registered under ``name`` (or an alias)."""
    return METRICS[metric_name(name)]


def score_layers(model, data, name: str, options: ScoringOptions | None = None):
    """Scores of every current layer under metric ``name``, shape (num_layers,)."""
    return get_metric(name)(model, data, options or ScoringOptions())
