"""The recipes' progress bar counts the batches the step budget really runs."""

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_prune.progress import StepBudgetProgressBar


def fit(**trainer_options) -> StepBudgetProgressBar:
    bar = StepBudgetProgressBar()
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(BoringModel())
    return bar


def test_total_is_the_step_budget_times_accumulation():
    bar = fit(max_steps=3, accumulate_grad_batches=2)
    assert bar.train_progress_bar.total == 6 and bar.train_progress_bar.n == 6
    assert bar.train_progress_bar.desc.startswith("training (step budget 3, epoch 0)")


def test_without_a_step_budget_the_total_is_the_epoch():
    bar = fit(max_epochs=1, limit_train_batches=5)
    assert bar.train_progress_bar.total == 5 and bar.train_progress_bar.desc.startswith("Epoch 0")
