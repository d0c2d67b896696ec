"""``PruneStage``: score, select and remove decoder layers, with training-free compensation.

The math lives in :func:`lightning_prune.pruning.prune_layers` (papers 000, 001, 002); this
module declares its options once (used by the ``prune`` command, the recipes' ``prune:``
section and :class:`~lightning_prune.callbacks.stage.StageCallback`) and turns its record into
a replayable :class:`PruneDecision`.
"""

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_prune.compensation import make_compensation
from lightning_prune.compensation.magnitude import check_foldable, fold_residual_scale
from lightning_prune.compensation.projection import SOLVERS
from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions, metric_name
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import remove_layers, validate_layer_indices
from lightning_prune.pruning import prune_layers, resolve_protection
from lightning_prune.selection import check_selection, protected_positions, removal_count
from lightning_prune.stages.base import Decision, Reduce, Stage, identity_reduce

__all__ = ["PruneStage", "PruneDecision", "parse_indices"]


def parse_indices(value: str | int | list[int] | tuple[int, ...], what: str = "layers") -> list[int]:
    """``"12,13"`` / ``12`` / ``[12, 13]`` → ``[12, 13]``; non-integers are an :class:`InputError`."""
    if isinstance(value, int):
        return [value]
    items = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else list(value)
    try:
        return [int(item) for item in items]
    except (TypeError, ValueError) as error:
        raise InputError(f"--{what} takes comma-separated integers such as 12,13; got {value!r}") from error


@dataclass
class PruneStage(Stage):
    """Remove decoder layers (Prune&Comp 000, GradMAP 001, layer relevance 002).

    Args:
        metric: importance metric: magnitude, taylor, block_influence (bi), contiguous (cl),
            removal_perplexity (ppl), gradient, accuracy or random.
        selection: one_shot, iterative (re-score after every removal) or contiguous.
        num_layers: decoder layers to remove (give exactly one of num_layers, ratio, layers).
        ratio: fraction of the layers to remove.
        layers: explicit original layer indices to remove, in this order.
        compensation: none, magnitude (MagComp, 000) or projection (GradMAP stage 2, 001).
        projection_solver: how projection compensation fits W': closed_form (ridge solve, λ chosen
            on held-out calibration tokens) or adam (the paper's 200 Adam steps, λ 1e-3).
        protect_first: first layers never removed (default: the metric's paper setting).
        protect_last: last layers never removed (default: the metric's paper setting).
        batch_size: calibration blocks per forward pass.
        seed: seed of the random metric.
    """

    metric: str = "block_influence"
    selection: str = "one_shot"
    num_layers: int | None = None
    ratio: float | None = None
    layers: list[int] | str | None = None
    compensation: str = "none"
    projection_solver: str = "closed_form"
    protect_first: int | None = None
    protect_last: int | None = None
    batch_size: int = 8
    seed: int = 0

    name = "prune"
    shards_calibration = True

    def __post_init__(self):
        if isinstance(self.layers, (str, int)):
            self.layers = parse_indices(self.layers) if str(self.layers).strip() else None

    def check(self, config):
        """Validate every choice against ``config``; return the config after the removal."""
        given = [name for name in ("layers", "num_layers", "ratio") if getattr(self, name) is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of --layers, --num_layers or --ratio (got {', '.join(given) or 'none'})")
        if self.batch_size < 1:
            raise InputError(f"prune: batch_size {self.batch_size} must be >= 1")
        depth = config.num_hidden_layers
        make_compensation(self.compensation)
        if self.projection_solver not in SOLVERS:
            raise InputError(f"--projection_solver {self.projection_solver!r} is not known; choose one of {', '.join(SOLVERS)}")
        if self.projection_solver != "closed_form" and self.compensation != "projection":
            raise InputError(
                f"--projection_solver {self.projection_solver} applies only to --compensation projection "
                f"(got --compensation {self.compensation}); drop it or use projection compensation"
            )
        if self.layers is not None:
            count = len(validate_layer_indices(self.layers, depth))
        else:
            metric = metric_name(self.metric)
            check_selection(self.selection)
            if metric == "contiguous" and self.selection != "contiguous":
                raise InputError("metric 'contiguous' scores blocks; use it with selection contiguous")
            first, last = resolve_protection(metric, self.protect_first, self.protect_last)
            protected = len(protected_positions(depth, first, last))
            count = removal_count(depth, count=self.num_layers, ratio=self.ratio, protected=protected)
        after = copy.deepcopy(config)
        after.num_hidden_layers = depth - count
        return after

    def needs_calibration(self) -> bool:
        return self.layers is None or self.compensation != "none"

    def plan(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        *,
        reduce: Reduce = identity_reduce,
        progress: bool = True,
        scoring_data=None,
    ) -> "PruneDecision":
        """Score on ``scoring_data`` (default: the calibration blocks), remove, compensate."""
        if self.compensation != "none":
            make_compensation(self.compensation).check(model)
        options = ScoringOptions(batch_size=self.batch_size, seed=self.seed, reduce=reduce, progress=progress)
        data = calibration if scoring_data is None else scoring_data
        record = prune_layers(
            model,
            data,
            metric=self.metric,
            selection=self.selection,
            num_layers=self.num_layers,
            ratio=self.ratio,
            compensation=self.compensation,
            compensation_options={"solver": self.projection_solver} if self.compensation == "projection" else None,
            protect=(self.protect_first, self.protect_last),
            layers=self.layers,
            calibration_blocks=calibration,
            options=options,
        )
        tensors = {}
        if record.get("compensation") == "projection":
            position = record["kept_layers"].index(record["compensation_final"]["layer"])
            tensors["projection.down_proj"] = (
                Anatomy(model).part(Anatomy(model).layers[position], "down_proj").weight.detach().cpu().clone()
            )
        return PruneDecision({**record, "settings": asdict(self)}, tensors)


class PruneDecision(Decision):
    """Layers removed (original indices, removal order) and the compensation folded after each removal."""

    kind = "prune"

    def __init__(self, record: dict, tensors: dict[str, torch.Tensor] | None = None):
        self.record, self._tensors = record, dict(tensors or {})

    @property
    def removed_layers(self) -> list[int]:
        return list(self.record["removed_layers"])

    def apply(self, model: nn.Module) -> None:
        record = self.record
        compensation = record.get("compensation", "none")
        if compensation != "none":
            check_foldable(model, f"{compensation} compensation")
        alphas = {step["layer"]: step.get("alpha") for step in record.get("compensation_steps", [])}
        current = list(range(Anatomy(model).num_layers))
        for layer in self.removed_layers:
            if layer not in current:
                raise InputError(f"the plan removes layer {layer}, which this {len(current)}-layer model does not have")
            position = current.index(layer)
            remove_layers(model, [position])
            if compensation == "magnitude":
                fold_residual_scale(model, position, alphas[layer])
            del current[position]
        if compensation == "projection":
            position = current.index(record["compensation_final"]["layer"])
            down = Anatomy(model).part(Anatomy(model).layers[position], "down_proj")
            with torch.no_grad():
                down.weight.copy_(self._tensors["projection.down_proj"].to(down.weight))

    def to_json(self) -> dict:
        return self.record

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    @classmethod
    def from_json(cls, data: dict, tensors: dict[str, torch.Tensor]) -> "PruneDecision":
        if not isinstance(data.get("removed_layers"), list):
            raise InputError("prune decision has no removed_layers list")
        return cls(data, tensors)

    def summary(self) -> str:
        record = self.record
        how = f"{record.get('metric', 'explicit')}/{record.get('selection', 'given')}"
        return f"prune: remove layers {self.removed_layers} ({how}, compensation {record.get('compensation', 'none')})"
