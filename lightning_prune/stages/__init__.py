"""Stages (plain PyTorch, no Lightning) and the decisions they take; see :mod:`lightning_prune.stages.base`."""

from lightning_prune.stages.base import Decision, Stage, identity_reduce
from lightning_prune.stages.merge import MergeDecision, MergeStage
from lightning_prune.stages.plan import (
    CHECKPOINT_KEY,
    DECISIONS,
    PLAN_NAME,
    PLAN_TENSORS_NAME,
    STAGES,
    apply_decisions,
    check_fingerprint,
    check_stages,
    checkpoint_decisions,
    checkpoint_entry,
    decisions_from,
    fingerprint,
    format_plan,
    plan_json,
    plan_tensors,
    read_plan,
    same_decisions,
)
from lightning_prune.stages.prune import PruneDecision, PruneStage
from lightning_prune.stages.sparsify import SparsifyStage, SparsityDecision

__all__ = [
    "Stage",
    "Decision",
    "identity_reduce",
    "PruneStage",
    "PruneDecision",
    "MergeStage",
    "MergeDecision",
    "SparsifyStage",
    "SparsityDecision",
    "STAGES",
    "DECISIONS",
    "PLAN_NAME",
    "PLAN_TENSORS_NAME",
    "fingerprint",
    "check_stages",
    "plan_json",
    "plan_tensors",
    "decisions_from",
    "read_plan",
    "check_fingerprint",
    "apply_decisions",
    "CHECKPOINT_KEY",
    "checkpoint_entry",
    "checkpoint_decisions",
    "same_decisions",
    "format_plan",
]
