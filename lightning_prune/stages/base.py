"""The seam between the papers' math and the shells: ``Stage`` -> ``Decision``.

A :class:`Stage` is plain PyTorch: ``check(config)`` validates its settings against the model's
config before any weight loads, and ``plan(model, calibration, reduce)`` computes what to do,
changes the model accordingly and returns a :class:`Decision`.

A :class:`Decision` is data that knows how to act without calibration data:

- ``apply(model)`` replays it on the original (or previous stage's) model: resume, reload,
  ``lightning-prune apply --plan``;
- ``to_json()`` / ``from_json()`` (plus ``tensors()`` for what does not fit JSON, e.g. sparsity
  masks) serialise it to ``decisions.json`` / ``decisions.safetensors`` and ``checkpoint["decisions"]``;
- ``trainable(model)`` names the parameters a following distillation trains (merged layers);
- ``constrain(model)`` keeps a training step inside the decision (sparsity re-masks trainable weights);
- ``on_export(model)`` fixes up an exported model (sparsity re-applies its masks after a LoRA merge);
- ``on_save(model, directory)`` rewrites the saved files (sparsity's compressed-tensors export).

A stage that needs the model as it was before any stage (a dense teacher) or the earlier
decisions implements ``observe(model, calibration)`` (called once, on the unchanged model,
before the first stage plans) and ``follow(decisions)`` (called right before its ``plan``);
``follows`` names the stages one of which must come before it.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

__all__ = ["Reduce", "identity_reduce", "Decision", "Stage"]

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a float tensor over ranks (DDP); the identity in one process."""


def identity_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """One process: the local sum is the global sum."""
    return tensor


class Decision(ABC):
    """What a stage decided, replayable without data."""

    kind: ClassVar[str]

    @abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Change ``model`` (the model before this stage) exactly as the stage did."""

    @abstractmethod
    def to_json(self) -> dict:
        """Plain data (JSON types only) describing the decision."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the decision needs beyond its JSON (stored in ``decisions.safetensors``)."""
        return {}

    @classmethod
    @abstractmethod
    def from_json(cls, data: dict, tensors: dict[str, torch.Tensor]) -> "Decision":
        """The decision stored by :meth:`to_json` and :meth:`tensors`."""

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of ``model`` that a distillation stage after this one trains (default: none)."""
        return []

    def constrain(self, model: nn.Module) -> None:
        """Restore the decision's invariants after an optimizer step (default: nothing to keep)."""

    def mask_gradients(self, model: nn.Module) -> None:
        """Zero gradients the decision forbids, before the optimizer step (default: none)."""

    def on_export(self, model: nn.Module) -> None:
        """Fix up a model exported for saving (default: nothing)."""

    def on_save(self, model: nn.Module, directory) -> None:
        """Rewrite the files ``save_pretrained`` just wrote into ``directory`` (default: nothing)."""

    def measurements(self) -> dict:
        """Values measured while deciding, for ``metrics.json`` (default: none)."""
        return {}

    @abstractmethod
    def summary(self) -> str:
        """One human line: what this decision does."""

    def signature(self) -> str:
        """A short string equal on every rank that took the same decision (checked under DDP)."""
        return self.summary()


class Stage(ABC):
    """A model-changing step: settings checked up front, then ``plan`` -> :class:`Decision`."""

    name: ClassVar[str]
    shards_calibration: ClassVar[bool] = False
    """Whether its statistics are sums that ranks can compute on shards and all-reduce."""
    follows: ClassVar[tuple[str, ...]] = ()
    """Stage names one of which must come before this stage (empty: no requirement)."""

    @abstractmethod
    def check(self, config) -> None:
        """Validate the settings against the model's config (before any weight loads)."""

    @abstractmethod
    def needs_calibration(self) -> bool:
        """Whether :meth:`plan` needs calibration token blocks."""

    def observe(self, model: nn.Module, calibration: torch.Tensor | None, *, progress: bool = True) -> None:
        """See the model before the first stage changes it, on this stage's calibration blocks (default: nothing)."""

    def follow(self, decisions: Sequence[Decision]) -> None:
        """Receive the decisions of the stages before this one, right before :meth:`plan` (default: nothing)."""

    @abstractmethod
    def plan(
        self, model: nn.Module, calibration: torch.Tensor | None, *, reduce: Reduce = identity_reduce, progress: bool = True
    ) -> Decision:
        """Decide on calibration blocks (N, T), change ``model`` in place and return the decision."""
