"""Lightning callbacks that decide when and where the core stages run (``lightning_prune.callbacks``)."""

from lightning_prune.callbacks.stage import StageCallback

__all__ = ["StageCallback"]
