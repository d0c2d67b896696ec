"""Stages (plain PyTorch, no Lightning) and the decisions they take; see :mod:`lightning_prune.stages.base`.

Plans (serialising, checking and replaying decision lists) live in :mod:`lightning_prune.stages.plan`.
"""

from lightning_prune.stages.base import Decision, Stage, identity_reduce
from lightning_prune.stages.gap_distill import GapDistillDecision, GapDistillStage
from lightning_prune.stages.merge import MergeDecision, MergeStage
from lightning_prune.stages.plan import DECISIONS, STAGES
from lightning_prune.stages.prune import PruneDecision, PruneStage
from lightning_prune.stages.sparsify import SparsifyStage, SparsityDecision

__all__ = ["Stage", "Decision", "identity_reduce", "PruneStage", "PruneDecision", "MergeStage", "MergeDecision"]
__all__ += ["SparsifyStage", "SparsityDecision", "GapDistillStage", "GapDistillDecision", "STAGES", "DECISIONS"]
