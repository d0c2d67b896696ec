"""A run's plan: the ordered decisions of its stages, checked, stored and replayed.

``decisions.json`` holds the JSON of every decision plus the fingerprint of the model it was
taken on; ``decisions.safetensors`` (only when a decision has tensors: sparsity masks, merged
layers, a projection) holds the rest, keyed ``"{index}/{name}"``. The same content goes into
``checkpoint["decisions"]`` as plain data and tensors, so checkpoints load with
``torch.load(weights_only=True)``.
"""

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_prune.errors import InputError, MissingInputError
from lightning_prune.stages.base import Decision, Stage
from lightning_prune.stages.gap_distill import GapDistillDecision, GapDistillStage
from lightning_prune.stages.merge import MergeDecision, MergeStage
from lightning_prune.stages.prune import PruneDecision, PruneStage
from lightning_prune.stages.sparsify import SparsifyStage, SparsityDecision

__all__ = [
    "STAGES",
    "DECISIONS",
    "PLAN_NAME",
    "PLAN_TENSORS_NAME",
    "PLAN_FORMAT",
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
CHECKPOINT_KEY = "decisions"

STAGES: dict[str, type[Stage]] = {"prune": PruneStage, "merge": MergeStage, "sparsify": SparsifyStage, "distill_gap": GapDistillStage}
DECISIONS: dict[str, type[Decision]] = {
    "prune": PruneDecision,
    "merge": MergeDecision,
    "sparsify": SparsityDecision,
    "distill_gap": GapDistillDecision,
}
PLAN_NAME, PLAN_TENSORS_NAME, PLAN_FORMAT = "decisions.json", "decisions.safetensors", 1
_FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def fingerprint(config) -> dict:
    """What identifies the model a plan was made for (family and every shape a decision depends on)."""
    return {key: getattr(config, key, None) for key in _FINGERPRINT_KEYS}


def check_stages(stages: Sequence[Stage], config):
    """Validate a stage list in order against ``config`` (before any weight loads); return the final config.

    Refused: the same stage twice (combine them into one), layer removal, merging or gap
    distillation after sparsity (its masks are keyed by layer position and would describe other
    layers, or be filled in by training), and a stage without one of the stages it ``follows``
    before it (gap distillation needs a prune or merge).
    """
    names = [stage.name for stage in stages]
    for name in set(names):
        if names.count(name) > 1:
            raise InputError(
                f"stage {name!r} appears {names.count(name)} times; give each stage once (one stage can remove several layers)"
            )
    if "sparsify" in names and any(n in ("prune", "merge", "distill_gap") for n in names[names.index("sparsify") + 1 :]):
        raise InputError(
            f"stage order {names} removes or merges layers after sparsify (or retrains them); put sparsify last (its masks are per layer)"
        )
    for index, stage in enumerate(stages):
        if stage.follows and not set(stage.follows) & set(names[:index]):
            raise InputError(f"stage {stage.name!r} needs one of {', '.join(stage.follows)} before it (stage order {names})")
    current = copy.deepcopy(config)
    for stage in stages:
        current = stage.check(current)
    return current


def plan_json(decisions: Sequence[Decision], model_fingerprint: dict, source: str | None = None) -> dict:
    """The body of ``decisions.json``."""
    return {
        "format": PLAN_FORMAT,
        "model": {"source": source, "fingerprint": model_fingerprint},
        "decisions": [{"kind": decision.kind, **decision.to_json()} for decision in decisions],
    }


def plan_tensors(decisions: Sequence[Decision]) -> dict[str, torch.Tensor]:
    """Every decision's tensors, keyed ``"{index}/{name}"`` (contiguous CPU tensors for safetensors)."""
    return {f"{i}/{name}": value.detach().cpu().contiguous() for i, d in enumerate(decisions) for name, value in d.tensors().items()}


def decisions_from(data: dict, tensors: dict[str, torch.Tensor], where: str = "plan") -> list[Decision]:
    """Decisions from a ``decisions.json`` body (or ``checkpoint["decisions"]``) and its tensors."""
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("decisions"), list):
        raise InputError(f"{where} is not a lightning-prune plan (format {PLAN_FORMAT} with a decisions list)")
    decisions = []
    for index, entry in enumerate(data["decisions"]):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in DECISIONS:
            raise InputError(f"{where}: decision {index} has kind {kind!r}; known kinds: {', '.join(DECISIONS)}")
        prefix = f"{index}/"
        own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        body = {key: value for key, value in entry.items() if key != "kind"}
        decisions.append(DECISIONS[kind].from_json(body, own))
    return decisions


def read_plan(path: str | Path) -> tuple[list[Decision], dict]:
    """``(decisions, model info)`` from a ``decisions.json`` (its ``decisions.safetensors`` beside it)."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_NAME
    if not path.is_file():
        raise MissingInputError(f"--plan {str(path)!r} does not exist; pass the decisions.json of a run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"--plan {str(path)!r} is not valid JSON ({error}); pass the decisions.json of a run") from error
    tensor_file = path.with_name(PLAN_TENSORS_NAME)
    try:
        tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    except Exception as error:  # safetensors raises its own error types for a broken header
        raise InputError(f"{str(tensor_file)!r} is not a readable safetensors file ({error})") from error
    decisions = decisions_from(data, tensors, where=f"--plan {str(path)!r}")
    return decisions, data.get("model", {})


def check_fingerprint(expected: dict, config, where: str) -> None:
    """Refuse a plan made for another model, naming every field that differs."""
    actual = fingerprint(config)
    different = {key: (value, actual.get(key)) for key, value in expected.items() if actual.get(key) != value}
    if different:
        text = ", ".join(f"{key} {want} vs {got}" for key, (want, got) in different.items())
        raise InputError(f"{where} was made for another model ({text} in the plan vs this model); use the model it was made for")


def apply_decisions(model: nn.Module, decisions: Sequence[Decision]) -> None:
    """Replay decisions in order (no calibration data)."""
    for decision in decisions:
        decision.apply(model)


def checkpoint_entry(decisions: Sequence[Decision], model_fingerprint: dict, source: str | None) -> dict:
    """What ``checkpoint["decisions"]`` holds: the plan as JSON types and its tensors."""
    return {"plan": plan_json(decisions, model_fingerprint, source), "tensors": plan_tensors(decisions)}


def checkpoint_decisions(checkpoint: dict, where: str = "checkpoint") -> list[Decision] | None:
    """The decisions stored in a checkpoint (``None`` if it has none)."""
    entry = checkpoint.get(CHECKPOINT_KEY)
    if entry is None:
        return None
    return decisions_from(entry["plan"], entry.get("tensors", {}), where=where)


def same_decisions(first: Sequence[Decision], second: Sequence[Decision]) -> bool:
    """Whether two decision lists describe the same architecture and changes."""
    return [(d.kind, d.signature()) for d in first] == [(d.kind, d.signature()) for d in second]


def format_plan(decisions: Sequence[Decision], before: dict, after: dict) -> str:
    """Human preview: one line per decision, then layers, parameters and weight bytes before -> after."""
    lines = [f"  {index + 1}. {decision.summary()}" for index, decision in enumerate(decisions)] or ["  (no stages)"]
    for key, label in (("num_layers", "layers"), ("num_parameters", "parameters"), ("num_bytes", "safetensors bytes")):
        ratio = after[key] / before[key] if before[key] else float("nan")
        lines.append(f"  {label}: {before[key]:,} -> {after[key]:,} ({ratio:.1%})")
    return "plan:\n" + "\n".join(lines)
