"""``lightning-prune prune``: remove decoder layers (given, or chosen by a metric), optionally compensate,
save the model, report perplexity before/after."""

from lightning_prune.commands.staged import StageRun
from lightning_prune.stages import PruneStage

__all__ = ["prune"]


def prune(stage: PruneStage, run: StageRun) -> dict:
    """Remove decoder layers (given, or chosen by an importance metric) and save the smaller model.

    Args:
        stage: the pruning options (:class:`~lightning_prune.stages.PruneStage`).
        run: data, evaluation and output options (:class:`~lightning_prune.commands.staged.StageRun`).
    """
    return run.run(stage)
