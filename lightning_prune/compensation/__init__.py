"""Training-free compensation after layer removal: registry of short names.

Each compensation has ``check(model)`` (refuse where folding is not exact), ``start`` (before
any removal), ``remove(model, position, blocks, options)`` (remove one layer, compensating
if the method works per removal) and ``finish`` (after all removals).
"""

import inspect

import torch
from torch import nn

from lightning_prune.compensation.magnitude import MagnitudeCompensation
from lightning_prune.compensation.projection import ProjectionCompensation
from lightning_prune.errors import InputError
from lightning_prune.model.surgery import remove_layers

__all__ = ["COMPENSATIONS", "NoCompensation", "MagnitudeCompensation", "ProjectionCompensation", "make_compensation"]


class NoCompensation:
    """Plain removal."""

    name = "none"

    def check(self, model: nn.Module) -> None:
        return None

    def start(self, model: nn.Module, blocks: torch.Tensor, options) -> None:
        return None

    def remove(self, model: nn.Module, position: int, blocks: torch.Tensor, options) -> dict:
        remove_layers(model, [position])
        return {"position": position}

    def finish(self, model: nn.Module, blocks: torch.Tensor, kept: list[int], options) -> dict:
        return {}


COMPENSATIONS = {"none": NoCompensation, "magnitude": MagnitudeCompensation, "projection": ProjectionCompensation}


def make_compensation(name: str, **settings):
    """A new compensation object for ``name``, or :class:`InputError` listing the valid names.

    Args:
        name: a key of :data:`COMPENSATIONS`.
        settings: keyword arguments of that compensation's class, e.g.
            ``make_compensation("projection", solver="adam")``.
    """
    if name not in COMPENSATIONS:
        raise InputError(f"unknown compensation {name!r}; choose one of {', '.join(COMPENSATIONS)}")
    accepted = inspect.signature(COMPENSATIONS[name]).parameters
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise InputError(f"compensation {name!r} has no option {unknown[0]!r}; its options: {', '.join(accepted) or 'none'}")
    return COMPENSATIONS[name](**settings)
