"""``MergeStage``: merge adjacent decoder layers (CoMe, paper 004 Alg. 1/2) into a target depth.

The math lives in :mod:`lightning_prune.merging`; a :class:`MergeDecision` holds the final
groups, the per-step record and the merged layers' weights (the merge picks units by channel
sensitivity on calibration data, so a replay without data needs the merged weights).
"""

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.merging.methods import check_merge_request, merge_model
from lightning_prune.merging.progressive import MergeRecord, layer_mapping, rebuild_merged_architecture
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.stages.base import Decision, Reduce, Stage, identity_reduce

__all__ = ["MergeStage", "MergeDecision"]


@dataclass
class MergeStage(Stage):
    """Merge ``num_layers`` layers away, two adjacent layers per step (paper 004).

    Args:
        num_layers: decoder layers to remove by merging (target depth = depth - num_layers).
        method: come (heuristic ratios), come_p (calibration-loss grid) or sum (weight average).
        p: skew exponent of the retention ratios (> 0).
        rho: minimum retention of the dominant layer, in [0, 1) (0 = off, the paper's LLaMA-2
            setting). Default 0.97, the paper's LLaMA-3 / Mistral value (spec (h)): on SmolLM2-135M
            at 30 -> 23 it is the setting measured to beat BI removal on WikiText-2 and C4
            (``benchmarks/merging_ablation.py``; p = 1, rho = 0 is 1.5x worse than removal).
        remerge: allow merging an already merged layer again.
        grid: CoMe-P grid size n (n + 1 candidate ratios).
        norm_rule: merged layer norms (come, come_p): mean (paper App. C), weighted (by
            retention ratio) or dominant (the largest-ratio layer's norms).
        parts: sublayers concatenated (come, come_p): both (paper), attention or ffn (the other
            sublayer is copied from the largest-ratio layer).
        batch_size: calibration blocks per forward pass.
    """

    num_layers: int = 7
    method: str = "come"
    p: float = 1.0
    rho: float = 0.97
    remerge: bool = True
    grid: int = 20
    norm_rule: str = "mean"
    parts: str = "both"
    batch_size: int = 8

    name = "merge"

    def check(self, config):
        if self.batch_size < 1:
            raise InputError(f"merge: batch_size {self.batch_size} must be >= 1")
        if self.grid < 1:
            raise InputError(f"merge: grid {self.grid} must be >= 1")
        target = check_merge_request(config, self.method, self.num_layers, self.p, self.rho, norm_rule=self.norm_rule, parts=self.parts)
        after = copy.deepcopy(config)
        after.num_hidden_layers = target
        return after

    def needs_calibration(self) -> bool:
        return True

    def plan(
        self, model: nn.Module, calibration: torch.Tensor | None, *, reduce: Reduce = identity_reduce, progress: bool = True
    ) -> "MergeDecision":
        target = self.check(model.config).num_hidden_layers
        if calibration is None:
            raise InputError("merge needs calibration token blocks")
        record = merge_model(
            model,
            list(calibration.split(self.batch_size)),
            target,
            method=self.method,
            p=self.p,
            rho=self.rho,
            remerge=self.remerge,
            grid=self.grid,
            norm_rule=self.norm_rule,
            parts=self.parts,
            progress=progress,
        )
        decision = MergeDecision({**record.to_dict(), "settings": asdict(self)})
        decision.capture_weights(model)
        return decision


class MergeDecision(Decision):
    """Merge groups (``groups[b]`` = original layers of layer ``b``), steps, and the merged layers' weights."""

    kind = "merge"

    def __init__(self, record: dict, tensors: dict[str, torch.Tensor] | None = None):
        self.record, self._tensors = record, dict(tensors or {})

    @property
    def groups(self) -> list[list[int]]:
        return [list(group) for group in self.record["groups"]]

    def merged_positions(self) -> list[int]:
        """Current positions of the merged layers (the students of the mapping P)."""
        return [entry.student for entry in layer_mapping(self.groups)]

    def capture_weights(self, model: nn.Module) -> None:
        """Keep a copy of every merged layer's parameters (CPU) for a data-free replay."""
        layers = Anatomy(model).layers
        self._tensors = {
            f"layers.{b}.{name}": value.detach().cpu().clone()
            for b in self.merged_positions()
            for name, value in layers[b].state_dict().items()
        }

    def apply(self, model: nn.Module) -> None:
        rebuild_merged_architecture(model, self.groups)
        layers = Anatomy(model).layers
        for b in self.merged_positions():
            prefix = f"layers.{b}."
            state = {key[len(prefix) :]: value for key, value in self._tensors.items() if key.startswith(prefix)}
            if state:
                layers[b].load_state_dict(state, strict=True)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        layers = Anatomy(model).layers
        return [p for b in self.merged_positions() for p in layers[b].parameters()]

    def to_json(self) -> dict:
        return self.record

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    @classmethod
    def from_json(cls, data: dict, tensors: dict[str, torch.Tensor]) -> "MergeDecision":
        if not isinstance(data.get("groups"), list):
            raise InputError("merge decision has no groups list")
        return cls(data, tensors)

    def as_record(self) -> MergeRecord:
        return MergeRecord(groups=self.groups, steps=list(self.record.get("steps", [])))

    def summary(self) -> str:
        merged = [group for group in self.groups if len(group) > 1]
        return f"merge: {sum(len(g) for g in self.groups)} -> {len(self.groups)} layers, merged groups {merged}"

    def signature(self) -> str:
        return str(self.groups)
