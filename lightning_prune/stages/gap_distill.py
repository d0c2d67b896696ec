"""``GapDistillStage``: layerwise distillation of the kept layers next to each removal gap.

After a prune (or merge) stage, each *gap* (original layers that no longer have a layer of
their own) leaves the layer after it reading a state it was never trained on. For every gap
this stage trains a small window of kept layers (``layers_before`` before the gap,
``layers_after`` after it) so that the student's hidden state at the window's end matches the
dense teacher's hidden state at the same point of the original stack, on the calibration
blocks. It is CoMe-mp (paper 004 App. B.2, Alg. 4: one window at a time, shallow to deep,
its input taken from the student's own path, ``FORWARDTOLAYER``, the target the teacher's
``GETSINGLEACTIVATION``) applied to pruning gaps instead of merged layers; the loss is from
:data:`lightning_prune.merging.distill.DISTILLATION_LOSSES` (default ``mse_norm``, the loss
measured best for merged layers in ``docs/results/merging.md``; Alg. 4's Eq. 6 is ``kl_raw``).

Chosen here (the papers do not specify it): which layers train (the window around a gap,
overlapping windows merged into one), the target (the teacher's state entering the first
original layer after the window, i.e. the output of original layer ``first(e) - 1``), plain
AdamW with a cosine decay to 0 over ``steps`` per window, and the teacher states.

Teacher states: :meth:`GapDistillStage.observe` runs the calibration blocks through the model
*before* the first stage changes it and keeps every decoder layer's output on the CPU
(``layers x blocks x seq_len x hidden`` values in the model's dtype; SmolLM2-135M with 16 x 128
tokens: 141 MB in fp32). :meth:`GapDistillStage.follow` receives the earlier decisions, from
which the original layers each current layer stands for are known. The
:class:`GapDistillDecision` stores the trained layers' weights, so it replays without data.

Under DDP the stage trains on this rank's shard of the calibration blocks; gradients are
summed over ranks through ``reduce`` and divided by the number of ranks, so every rank takes
the same step.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_prune.capture import capture, capture_layer_inputs, run_layers
from lightning_prune.errors import InputError
from lightning_prune.merging.distill import check_distillation_loss, distillation_loss, layer_outputs
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.modules.optim import warmup_cosine
from lightning_prune.onload import holding
from lightning_prune.stages.base import Decision, Reduce, Stage, identity_reduce

__all__ = ["GapDistillStage", "GapDistillDecision", "layer_spans", "gap_windows"]


def layer_spans(num_layers: int, decisions: Sequence[Decision]) -> list[list[int]]:
    """Original layers each current layer stands for, after replaying prune/merge ``decisions``.

    A pruned layer belongs to no span; a merged layer's span is its group.
    """
    spans = [[i] for i in range(num_layers)]
    for decision in decisions:
        if decision.kind == "prune":
            removed = set(decision.to_json()["removed_layers"])
            spans = [span for i, span in enumerate(spans) if i not in removed]
        elif decision.kind == "merge":
            spans = [[o for i in group for o in spans[i]] for group in decision.to_json()["groups"]]
    return spans


def gap_windows(spans: Sequence[Sequence[int]], num_original: int, before: int, after: int) -> list[dict]:
    """Windows of current layers to train, one per gap (overlapping windows merged), shallow to deep.

    A gap lies before current position ``q`` when ``first(q) - first(q - 1) > 1`` (``first(-1) = -1``,
    ``first(n) = num_original``): original layers were removed, or merged into layer ``q - 1``.
    Its window is ``[q - before, q + after)`` clipped to the stack; the target of a window
    ``[start, end)`` is the teacher's output of original layer ``first(end) - 1`` (the state
    entering the first original layer after the window).

    Returns:
        ``[{"start": a, "end": e, "target": t, "gaps": [q, ...]}]``; empty when nothing was removed.
    """
    n = len(spans)
    first = [-1, *[min(span) for span in spans], num_original]  # first[c + 1] = first(c)
    windows: list[dict] = []
    for q in range(n + 1):
        if first[q + 1] - first[q] <= 1:
            continue
        start, end = max(0, q - before), min(n, q + after)
        if end <= start:
            continue
        if windows and start < windows[-1]["end"]:
            windows[-1]["end"] = max(windows[-1]["end"], end)
            windows[-1]["gaps"].append(q)
        else:
            windows.append({"start": start, "end": end, "gaps": [q]})
    for window in windows:
        window["target"] = first[window["end"] + 1] - 1
    return windows


@dataclass
class GapDistillStage(Stage):
    """Train the kept layers next to each gap to reproduce the dense model's hidden state there.

    Args:
        layers_after: kept layers right after each gap that train (>= 0).
        layers_before: kept layers right before each gap that train (>= 0; a merge's merged
            layer is the layer before its gap).
        steps: optimizer steps per window (>= 1).
        lr: AdamW learning rate (> 0), decayed to 0 by a cosine over ``steps``; 1e-3 measured
            best of 1e-4 / 3e-4 / 1e-3 on SmolLM2-135M (``benchmarks/gap_distill_evidence.py``).
        weight_decay: AdamW weight decay (>= 0).
        batch_size: calibration blocks per step (>= 1).
        loss: kl_raw, kl_norm, mse_norm (default: measured best) or cosine.
        seed: seed of the batch order.
    """

    layers_after: int = 1
    layers_before: int = 0
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2
    loss: str = "mse_norm"
    seed: int = 0

    name = "distill_gap"
    shards_calibration = True
    follows = ("prune", "merge")

    def __post_init__(self):
        self._teacher: dict | None = None
        self._previous: list[Decision] = []

    def check(self, config):
        if self.layers_after < 0 or self.layers_before < 0 or self.layers_after + self.layers_before < 1:
            raise InputError(
                f"distill_gap: layers_after {self.layers_after} and layers_before {self.layers_before} must be >= 0 and train at least one layer"
            )
        if self.steps < 1:
            raise InputError(f"distill_gap: steps {self.steps} must be >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"distill_gap: lr {self.lr} must be a finite number > 0 (e.g. 1e-4)")
        if self.weight_decay < 0:
            raise InputError(f"distill_gap: weight_decay {self.weight_decay} must be >= 0")
        if self.batch_size < 1:
            raise InputError(f"distill_gap: batch_size {self.batch_size} must be >= 1")
        try:
            check_distillation_loss(self.loss)
        except InputError as error:
            raise InputError(f"distill_gap: {error}") from None
        return config

    def needs_calibration(self) -> bool:
        return True

    @torch.no_grad()
    def observe(self, model: nn.Module, calibration: torch.Tensor | None, *, progress: bool = True) -> None:
        """Keep every decoder layer's output on ``calibration`` (the dense teacher's states, CPU)."""
        if calibration is None:
            raise InputError("distill_gap needs calibration token blocks")
        anatomy = Anatomy(model)
        device = next(model.parameters()).device
        outputs: dict[int, list[torch.Tensor]] = {}
        was_training = model.training
        model.eval()
        for batch in calibration.split(self.batch_size):
            with capture(model, inputs=False, device="cpu") as record:
                layer_outputs(model, batch.to(device), [anatomy.num_layers - 1])
            for position, values in record.outputs.items():
                outputs.setdefault(position, []).extend(values)
        model.train(was_training)
        self._teacher = {
            "blocks": calibration.detach().cpu().clone(),
            "num_layers": anatomy.num_layers,
            "outputs": {p: torch.cat(v) for p, v in outputs.items()},
        }

    def follow(self, decisions: Sequence[Decision]) -> None:
        """The decisions of the stages before this one (they say where the gaps are)."""
        self._previous = list(decisions)

    def plan(
        self, model: nn.Module, calibration: torch.Tensor | None, *, reduce: Reduce = identity_reduce, progress: bool = True
    ) -> "GapDistillDecision":
        teacher = self._teacher
        if teacher is None or calibration is None or not torch.equal(teacher["blocks"], calibration.cpu()):
            raise InputError(
                "distill_gap needs the dense model's states on the same calibration blocks: call observe() before the first stage"
            )
        spans = layer_spans(teacher["num_layers"], self._previous)
        if len(spans) != Anatomy(model).num_layers:
            raise InputError(
                f"distill_gap: the earlier decisions leave {len(spans)} layers but the model has {Anatomy(model).num_layers}; "
                "pass every earlier decision to follow()"
            )
        windows = gap_windows(spans, teacher["num_layers"], self.layers_before, self.layers_after)
        was_training = model.training
        model.eval()
        layers = Anatomy(model).layers
        for index, window in enumerate(windows):
            with holding(model, layers[window["start"] : window["end"]]):  # onloaded: the window trains on the device
                window.update(self._train_window(model, calibration, teacher["outputs"][window["target"]], window, index, reduce))
        model.train(was_training)
        self._teacher = None  # the states are only needed once
        record = {"settings": asdict(self), "num_layers": len(spans), "spans": spans, "windows": windows}
        tensors = {
            f"layers.{c}.{name}": value.detach().cpu().clone()
            for window in windows
            for c in range(window["start"], window["end"])
            for name, value in layers[c].state_dict().items()
        }
        return GapDistillDecision(record, tensors)

    def _train_window(
        self, model: nn.Module, blocks: torch.Tensor, targets: torch.Tensor, window: dict, index: int, reduce: Reduce
    ) -> dict:
        """Train layers ``window[start:end]`` on (student input, teacher target) pairs; return losses."""
        positions = list(range(window["start"], window["end"]))
        batches = list(blocks.split(self.batch_size))
        goals = list(targets.split(self.batch_size))
        inputs = capture_layer_inputs(model, batches, start=window["start"])
        parameters = [p for c in positions for p in Anatomy(model).layers[c].parameters()]
        flags = [p.requires_grad for p in parameters]
        for parameter in parameters:
            parameter.requires_grad_(True)
        norm = Anatomy(model).final_norm
        ranks = reduce(torch.ones((), device=parameters[0].device))
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps=0, total_steps=self.steps))

        def loss_on(b: int) -> torch.Tensor:
            prediction = run_layers(model, inputs.hidden[b], inputs.kwargs[b], positions)
            return distillation_loss(self.loss, goals[b].to(prediction), prediction, norm=norm)

        def mean_loss() -> float:
            with torch.no_grad():
                total = sum(loss_on(b).float() * len(batches[b]) for b in range(len(batches)))
            return float(reduce(total.reshape(1)) / reduce(torch.tensor([float(len(blocks))], device=total.device)))

        before = mean_loss()
        generator = torch.Generator().manual_seed(self.seed + index)
        order: list[int] = []
        with torch.enable_grad():
            for _ in range(self.steps):
                if not order:
                    order = torch.randperm(len(batches), generator=generator).tolist()
                gradients = torch.autograd.grad(loss_on(order.pop()), parameters)
                for parameter, gradient in zip(parameters, gradients):
                    parameter.grad = reduce(gradient) / ranks
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
        return {"loss_before": before, "loss_after": mean_loss()}


class GapDistillDecision(Decision):
    """The windows trained around each gap and the trained layers' weights (``layers.{c}.{name}``)."""

    kind = "distill_gap"

    def __init__(self, record: dict, tensors: dict[str, torch.Tensor]):
        self.record, self._tensors = record, dict(tensors)

    def positions(self) -> list[int]:
        """Current positions of the trained layers."""
        return [c for window in self.record["windows"] for c in range(window["start"], window["end"])]

    def apply(self, model: nn.Module) -> None:
        layers = Anatomy(model).layers
        if len(layers) != self.record["num_layers"]:
            raise InputError(
                f"the distill_gap decision was taken on a {self.record['num_layers']}-layer model; this one has {len(layers)} layers"
            )
        for c in self.positions():
            prefix = f"layers.{c}."
            state = {key[len(prefix) :]: value for key, value in self._tensors.items() if key.startswith(prefix)}
            if not state:
                raise InputError(f"the distill_gap decision has no weights for layer {c} (decisions.safetensors missing?)")
            layers[c].load_state_dict(state, strict=True)

    def to_json(self) -> dict:
        return copy.deepcopy(self.record)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    @classmethod
    def from_json(cls, data: dict, tensors: dict[str, torch.Tensor]) -> "GapDistillDecision":
        if not isinstance(data.get("windows"), list) or not isinstance(data.get("num_layers"), int):
            raise InputError("distill_gap decision has no windows list or num_layers")
        return cls(data, tensors)

    def measurements(self) -> dict:
        return {"gap_loss": [{k: w[k] for k in ("start", "end", "loss_before", "loss_after")} for w in self.record["windows"]]}

    def summary(self) -> str:
        windows = self.record["windows"]
        trained = [list(range(w["start"], w["end"])) for w in windows]
        loss = self.record["settings"]["loss"]
        if not windows:
            return "distill_gap: no gaps, nothing trained"
        change = sum(w["loss_after"] for w in windows) / max(sum(w["loss_before"] for w in windows), 1e-12)
        return f"distill_gap: trained layers {trained} next to {len(windows)} gap(s) ({loss}, loss x{change:.2f})"

    def signature(self) -> str:
        return str([(w["start"], w["end"], w["target"]) for w in self.record["windows"]])
