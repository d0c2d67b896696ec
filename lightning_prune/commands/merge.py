"""``lightning-prune merge``: CoMe layer merging to a target depth, perplexity before/after."""

from lightning_prune.commands.staged import StageRun
from lightning_prune.stages import MergeStage

__all__ = ["merge"]


def merge(stage: MergeStage, run: StageRun) -> dict:
    """Merge adjacent decoder layers (CoMe, paper 004), removing num_layers layers.

    Args:
        stage: the merging options (:class:`~lightning_prune.stages.MergeStage`).
        run: data, evaluation and output options (:class:`~lightning_prune.commands.staged.StageRun`).
    """
    return run.run(stage)
