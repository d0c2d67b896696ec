"""``LayerPruningCallback``: remove decoder layers in ``setup("fit")``, before the optimizers exist.

When: ``setup("fit")`` runs after the process group is up and before ``configure_optimizers``
and the DDP wrapper, so the optimizer only ever sees the pruned architecture. The module's
``configure_model`` (idempotent) is called first in case it loads the model lazily.

DDP: every rank scores its own shard of the calibration blocks (``blocks[rank::world]``);
each metric sums its statistics (NLL, cosine, gradient norms, correct answers, …) and
reduces them with ``trainer.strategy.reduce(..., "sum")`` before scoring, so all ranks see
the same scores and take the same decision. The removed layers of every rank are gathered
and compared; a mismatch raises on every rank.

Checkpoints and resume (Lightning 2.6.6, ``Trainer._run``): ``setup`` → ``configure_model``
→ ``_restore_modules_and_callbacks`` (module ``on_load_checkpoint``, ``load_state_dict``,
*then* callback ``on_load_checkpoint``) → ``strategy.setup`` → optimizers. A callback's
``on_load_checkpoint`` therefore comes after the weights are loaded — too late to change the
architecture. So the decision is saved in ``checkpoint["layer_pruning"]``
(``on_save_checkpoint``) and, on resume, read in ``setup`` from the checkpoint ``fit`` is about
to restore (``fit(ckpt_path=...)``, ``--ckpt_path last`` included; see
:mod:`lightning_prune.callbacks.resume`) or from ``resume_from``, and re-applied (same layers
removed, embeddings untied if compensation untied them) without scoring, so ``load_state_dict``
finds exactly the saved architecture. Explicit ``layers`` that differ from the stored decision
are refused. ``on_load_checkpoint`` then checks that the checkpoint's decision is the one applied.
"""

import lightning as L
import torch

from lightning_prune.callbacks.resume import pending_checkpoint_path
from lightning_prune.compensation import make_compensation
from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions, metric_name
from lightning_prune.model.surgery import remove_layers, untie_embeddings
from lightning_prune.pruning import prune_layers
from lightning_prune.selection import check_selection

__all__ = ["LayerPruningCallback", "CHECKPOINT_KEY", "read_decision", "apply_decision", "check_agreement"]

CHECKPOINT_KEY = "layer_pruning"


def read_decision(path) -> dict:
    """The pruning decision stored in a Lightning checkpoint file (memory-mapped read)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if CHECKPOINT_KEY not in checkpoint:
        raise InputError(f"checkpoint {str(path)!r} holds no layer-pruning decision; it was not saved with LayerPruningCallback")
    return checkpoint[CHECKPOINT_KEY]


def apply_decision(model: torch.nn.Module, decision: dict) -> None:
    """Rebuild a saved architecture on a fresh model: remove the layers, untie if the run untied."""
    remove_layers(model, decision["removed_layers"])
    if decision.get("untied_embeddings"):
        untie_embeddings(model)


def check_agreement(gathered: torch.Tensor) -> None:
    """``gathered`` (world, k): every rank's removed layers; all rows must be equal."""
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"ranks took different pruning decisions: {gathered.tolist()}; calibration statistics must be reduced")


class LayerPruningCallback(L.Callback):
    """Score, select and remove decoder layers of ``pl_module.<model_attribute>`` before fitting.

    Args:
        metric: importance metric name (see :data:`lightning_prune.importance.METRICS`).
        selection: one_shot, iterative or contiguous.
        num_layers / ratio / layers: exactly one target: a count, a fraction, or explicit original indices.
        compensation: none, magnitude or projection.
        protect_first / protect_last: layers never removed (default: the metric's setting).
        calibration_blocks: token blocks (N, T); default ``trainer.datamodule.calibration_blocks()``.
        batch_size: calibration blocks per forward.
        seed: seed of the random metric.
        resume_from: checkpoint whose decision to re-apply instead of scoring.
        model_attribute: the LightningModule attribute holding the Hugging Face model.
    """

    def __init__(
        self,
        metric: str = "block_influence",
        selection: str = "one_shot",
        num_layers: int | None = None,
        ratio: float | None = None,
        compensation: str = "none",
        protect_first: int | None = None,
        protect_last: int | None = None,
        layers: list[int] | None = None,
        calibration_blocks: torch.Tensor | None = None,
        batch_size: int = 8,
        seed: int = 0,
        resume_from: str | None = None,
        model_attribute: str = "model",
    ):
        if sum(value is not None for value in (num_layers, ratio, layers)) != 1:
            raise InputError("give exactly one of num_layers, ratio or layers")
        self.metric, self.selection = metric_name(metric), check_selection(selection)
        make_compensation(compensation)
        self.compensation, self.num_layers, self.ratio, self.layers = compensation, num_layers, ratio, layers
        self.protect = (protect_first, protect_last)
        self.calibration_blocks, self.batch_size, self.seed = calibration_blocks, batch_size, seed
        self.resume_from, self.model_attribute = resume_from, model_attribute
        self.decision: dict | None = None

    def _blocks(self, trainer: L.Trainer) -> torch.Tensor:
        blocks = self.calibration_blocks
        if blocks is None and callable(getattr(trainer.datamodule, "calibration_blocks", None)):
            blocks = trainer.datamodule.calibration_blocks()
        if blocks is None:
            raise InputError("LayerPruningCallback needs calibration_blocks or a datamodule with calibration_blocks()")
        return blocks[trainer.global_rank :: trainer.world_size]

    def _reduce(self, trainer: L.Trainer, pl_module: L.LightningModule):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(tensor.to(pl_module.device), reduce_op="sum").to(tensor.device)

        return reduce

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.decision is not None:
            return
        if callable(getattr(pl_module, "configure_model", None)):
            pl_module.configure_model()
        model = getattr(pl_module, self.model_attribute)
        path = self.resume_from or pending_checkpoint_path(trainer)
        if path:
            decision = read_decision(path)
            if self.layers is not None and sorted(self.layers) != sorted(decision["removed_layers"]):
                raise InputError(f"checkpoint {path!r} removed layers {decision['removed_layers']} but this run is configured to "
                                 f"remove {list(self.layers)}; resume with the same layers or start a new run")
            apply_decision(model, decision)
        else:
            options = ScoringOptions(batch_size=self.batch_size, seed=self.seed, reduce=self._reduce(trainer, pl_module), progress=trainer.is_global_zero)
            needs_data = self.layers is None or self.compensation != "none"
            decision = prune_layers(
                model, self._blocks(trainer) if needs_data else None, metric=self.metric, selection=self.selection, num_layers=self.num_layers,
                ratio=self.ratio, compensation=self.compensation, protect=self.protect, layers=self.layers, options=options,
            )
        removed = torch.tensor(decision["removed_layers"], device=pl_module.device)
        check_agreement(trainer.strategy.all_gather(removed).reshape(trainer.world_size, -1))
        self.decision = decision

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.decision

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self.decision is not None and saved["removed_layers"] != self.decision["removed_layers"]:
            raise RuntimeError(
                f"checkpoint removed layers {saved['removed_layers']} but this run removed {self.decision['removed_layers']}; "
                "pass resume_from=<checkpoint> so the saved architecture is rebuilt"
            )
