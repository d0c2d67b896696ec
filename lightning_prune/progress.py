"""The recipes' training progress bar: totals from the step budget, not an "Epoch 0/-2" of an unbounded run.

With ``max_steps`` set and ``max_epochs`` unset, Lightning runs "until the steps are done" and its
default bar shows ``Epoch 0/-2`` and the epoch's full batch count. This bar counts the batches
this epoch will really run (``min(batches in the epoch, steps left x accumulate_grad_batches)``)
and says which optimizer step budget it works through. Public hooks and properties only.
"""

import math

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepBudgetProgressBar"]


def _epoch_batches(trainer) -> float:
    """Batches in one training epoch on this rank (``limit_train_batches`` applied); ``inf`` if unknown.

    Not ``total_train_batches``: Lightning caps that at ``max_steps``, ignoring gradient accumulation.
    """
    try:
        batches = float(len(trainer.train_dataloader))
    except TypeError:
        return math.inf
    limit = trainer.limit_train_batches
    return min(batches, limit) if isinstance(limit, int) else math.floor(batches * limit)


class StepBudgetProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training total and description follow ``trainer.max_steps``."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps is None or trainer.max_steps < 0:
            return
        left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
        total = _epoch_batches(trainer)
        self.train_progress_bar.total = left if math.isinf(total) else min(total, left)
        self.train_progress_bar.set_description(f"training (step budget {trainer.max_steps}, epoch {trainer.current_epoch})")
