"""``SparsifyStage``: unstructured or N:M weight sparsity with uniform / OWL / DLP allocation (paper 003).

The math lives in :mod:`lightning_prune.sparsity`; a :class:`SparsityDecision` holds the
keep masks (keyed ``layers.{i}.{role}``, stored one bit per weight: :class:`PackedMasks`),
per-layer sparsities and, for SparseGPT (whose OBS update also changes the kept weights), the
kept weights' new values (only those: with the masks they are the pruned weights; plans written
before this held the whole pruned weights, which still replay). During training it keeps trainable masked weights at zero
(gradients masked before the step, weights re-masked after it, each mask unpacked on the
weight's device only while it is used); frozen bases (LoRA, 4-bit QLoRA) are left alone since
they cannot change, and the exported model gets the masks again after the adapters are merged
into it. Under DDP each rank calibrates on its shard of the blocks and the statistics are
all-reduced (:mod:`lightning_prune.sparsity.sequential`); the signature that ``StageCallback``
compares across ranks includes a checksum of the masks.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.sparsity import check_magnitude_scope, check_mask_rule
from lightning_prune.sparsity.allocation import check_allocation
from lightning_prune.sparsity.compressed import check_export_format, save_compressed
from lightning_prune.sparsity.masks import apply_masks, prunable_linears
from lightning_prune.sparsity.nm import check_mixed, check_widths, parse_pattern, resolve_sparsity
from lightning_prune.sparsity.packing import PackedMasks, mask_checksum, unpack_mask
from lightning_prune.sparsity.sequential import check_method, sparsify
from lightning_prune.stages.base import Decision, Reduce, Stage, identity_reduce

__all__ = ["SparsifyStage", "SparsityDecision"]


@dataclass
class SparsifyStage(Stage):
    """Prune the decoder's projection weights to a sparsity, allocated per layer (003 Algorithm 1).

    Args:
        method: magnitude, wanda or sparsegpt.
        allocation: uniform, owl or dlp (003 Eq. 5-6).
        sparsity: fraction of weights to prune in [0, 1) (default 0.5; with structure: 1 - N/M).
        alpha: DLP's alpha / OWL's lambda (default: dlp from 003 Table 19 by sparsity, owl 0.08, mixed N:M 0.6/M).
        structure: N:M pattern such as 2:4 (N kept of every M); mixed N:M with owl/dlp; empty: unstructured.
        batch_size: calibration blocks per forward pass.
        mask_rule: SparseGPT's unstructured mask: block (the reference code: one threshold per 128-column
            block, all rows together) or row (exact per-row counts).
        magnitude_scope: magnitude pruning compares weights per row, or over the whole matrix
            (matrix reproduces paper 003's Magnitude baseline).
        dlp_statistic: DLP's per-layer statistic: median (paper 003 Eq. 5) or mean (the authors' code).
        owl_m: OWL's outlier threshold multiplier M.
        export_format: how model/ stores the weights: dense (zeros in place) or compressed
            (compressed-tensors sparse-bitmask, sparse-24-bitmask for 2:4; needs lightning-prune[compressed]).
    """

    method: str = "wanda"
    allocation: str = "dlp"
    sparsity: float | None = None
    alpha: float | None = None
    structure: str | None = None
    batch_size: int = 8
    mask_rule: str = "block"
    magnitude_scope: str = "row"
    dlp_statistic: str = "median"
    owl_m: float = 5.0
    export_format: str = "dense"

    name = "sparsify"
    shards_calibration = True

    def resolved(self) -> tuple:
        """(pattern, target sparsity, alpha) after defaults, validated."""
        check_method(self.method)
        check_mask_rule(self.mask_rule)
        check_magnitude_scope(self.magnitude_scope)
        pattern = parse_pattern(self.structure)
        target = resolve_sparsity(self.sparsity, pattern)
        alpha = check_allocation(self.allocation, target, self.alpha, pattern=pattern, dlp_statistic=self.dlp_statistic, owl_m=self.owl_m)
        if pattern and self.allocation != "uniform":
            check_mixed(pattern)
        return pattern, target, alpha

    def check(self, config):
        if self.batch_size < 1:
            raise InputError(f"sparsify: batch_size {self.batch_size} must be >= 1")
        check_export_format(self.export_format)
        pattern, _, _ = self.resolved()
        if pattern:
            check_widths(config, pattern)
        return config

    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.allocation != "uniform"

    def plan(
        self, model: nn.Module, calibration: torch.Tensor | None, *, reduce: Reduce = identity_reduce, progress: bool = True
    ) -> "SparsityDecision":
        pattern, target, alpha = self.resolved()
        device = next(model.parameters()).device
        blocks = calibration.to(device) if calibration is not None else None
        result = sparsify(
            model,
            blocks,
            method=self.method,
            allocation=self.allocation,
            sparsity=target,
            alpha=alpha,
            pattern=pattern,
            batch_size=self.batch_size,
            progress=progress,
            mask_rule=self.mask_rule,
            magnitude_scope=self.magnitude_scope,
            dlp_statistic=self.dlp_statistic,
            owl_m=self.owl_m,
            reduce=reduce,
        )
        record = {
            "settings": {**asdict(self), "sparsity": target, "alpha": alpha},
            "layer_sparsity": result.layer_sparsity,
            "layer_statistic": result.layer_statistic,
            "layer_patterns": result.layer_patterns,
            "measured": result.measured(),
        }
        # SparseGPT also updates the kept weights (OBS): the masks alone do not replay it, their kept values do
        return SparsityDecision(record, result.masks, kept=result.kept)


class SparsityDecision(Decision):
    """Keep masks per projection (``True`` = kept, stored one bit per weight) and the allocation that produced them.

    Args:
        record: the settings, allocation and measurements (JSON).
        masks: keep masks by projection name.
        weights: whole pruned weights by name (plans written before ``kept`` existed).
        kept: SparseGPT: the kept weights' values by name, in row-major order of the mask.
    """

    kind = "sparsify"

    def __init__(
        self,
        record: dict,
        masks: Mapping[str, torch.Tensor],
        weights: dict[str, torch.Tensor] | None = None,
        kept: dict[str, torch.Tensor] | None = None,
    ):
        self.record = record
        self.masks = masks if isinstance(masks, PackedMasks) else PackedMasks(masks)
        self.weights = dict(weights or {})
        self.kept = dict(kept or {})
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}  # packed bits of trainable weights

    def apply(self, model: nn.Module) -> None:
        linears = dict(prunable_linears(model))
        missing = sorted(set(self.masks) - set(linears))
        if missing:
            raise InputError(f"the sparsity plan names {missing[0]!r}, which this model does not have ({len(missing)} missing)")
        for name in self.masks:
            if self.masks.shape(name) != tuple(linears[name].weight.shape):
                raise InputError(
                    f"sparsity mask {name!r} has shape {self.masks.shape(name)}, the model's weight {tuple(linears[name].weight.shape)}"
                )
        for name, values in self.kept.items():
            if name not in self.masks or values.numel() != self.masks.kept(name):
                kept = self.masks.kept(name) if name in self.masks else "no"
                raise InputError(f"the sparsity plan has {values.numel()} kept weights for {name!r}, its mask keeps {kept}")
        with torch.no_grad():
            for name, weight in self.weights.items():
                linears[name].weight.copy_(weight.to(linears[name].weight))
            for name, values in self.kept.items():  # the kept values in place, +0.0 elsewhere (as SparseGPT leaves them)
                weight = linears[name].weight
                keep = self.masks[name].to(weight.device)
                weight.copy_(torch.zeros_like(weight).masked_scatter_(keep, values.to(weight)))
        apply_masks(model, self.masks)

    def _trainable_masks(self, model: nn.Module):
        """(weight, bool mask on its device) of every trainable masked weight, unpacked one at a time."""
        for name, linear in prunable_linears(model):
            weight = linear.weight
            if name in self.masks and weight.requires_grad:
                key = (name, weight.device)
                if key not in self._on_device:
                    self._on_device[key] = self.masks.packed(name).to(weight.device)
                yield weight, unpack_mask(self._on_device[key], self.masks.shape(name))

    @torch.no_grad()
    def constrain(self, model: nn.Module) -> None:
        for weight, mask in self._trainable_masks(model):
            weight.mul_(mask)

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        for weight, mask in self._trainable_masks(model):
            if weight.grad is not None:
                weight.grad.mul_(mask)

    def on_export(self, model: nn.Module) -> None:
        apply_masks(model, self.masks)

    def on_save(self, model: nn.Module, directory) -> None:
        settings = self.record["settings"]
        if settings.get("export_format", "dense") == "compressed":
            uniform_24 = settings.get("structure") == "2:4" and settings.get("allocation") == "uniform"
            save_compressed(model, directory, "2:4" if uniform_24 else None)

    def measurements(self) -> dict:
        return {"measured_sparsity": self.record["measured"]}

    def to_json(self) -> dict:
        return self.record

    def tensors(self) -> dict[str, torch.Tensor]:
        """Packed masks (``packed.{name}``, uint8, 1 bit per weight) with their shapes, and SparseGPT's kept weights."""
        return {
            **{f"packed.{name}": self.masks.packed(name) for name in self.masks},
            **{f"shape.{name}": torch.tensor(self.masks.shape(name)) for name in self.masks},
            **{f"weight.{name}": weight for name, weight in self.weights.items()},
            **{f"kept.{name}": values for name, values in self.kept.items()},
        }

    @classmethod
    def from_json(cls, data: dict, tensors: dict[str, torch.Tensor]) -> "SparsityDecision":
        def named(prefix: str) -> dict[str, torch.Tensor]:
            return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}

        packed, shapes = named("packed."), {name: tuple(shape.tolist()) for name, shape in named("shape.").items()}
        masks = PackedMasks.from_packed(packed, shapes) if packed.keys() == shapes.keys() else PackedMasks()
        masks.update(named("mask."))  # plans written before packing hold bool masks
        if not masks:
            raise InputError("sparsity decision has no masks (decisions.safetensors missing or from another plan)")
        return cls(data, masks, named("weight."), named("kept."))

    def summary(self) -> str:
        settings = self.record["settings"]
        kept = sum(self.masks.kept(name) for name in self.masks)
        total = sum(self.masks.numel(name) for name in self.masks)
        structure = f", {settings['structure']}" if settings.get("structure") else ""
        return (
            f"sparsify: {settings['method']} + {settings['allocation']}{structure}, "
            f"{1 - kept / max(total, 1):.1%} of {total:,} projection weights zero"
        )

    def signature(self) -> str:
        """Per-layer sparsities and a checksum of every mask (equal on ranks that chose the same masks)."""
        return f"{[round(s, 6) for s in self.record['layer_sparsity']]} masks {mask_checksum(self.masks)}"
