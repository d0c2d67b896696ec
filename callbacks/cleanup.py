"""``RemoveFailedRun``: a recipe that fails before it saved a checkpoint leaves no run directory behind."""

import shutil
from pathlib import Path

import lightning as L

from lightning_prune.callbacks.stage import PlanOnly

__all__ = ["RemoveFailedRun"]


class RemoveFailedRun(L.Callback):
    """On an exception in ``fit`` (not a dry run's stop), remove ``run_dir`` if this run created it and wrote no checkpoint.

    Args:
        run_dir: the run directory; whether it exists is noted now, before the trainer writes anything.
    """

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self.created = not self.run_dir.exists()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        checkpoints = self.run_dir / "checkpoints"
        resumable = checkpoints.is_dir() and any(checkpoints.iterdir())
        if isinstance(exception, PlanOnly) or not self.created or resumable or not trainer.is_global_zero:
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
