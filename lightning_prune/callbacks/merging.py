"""``LayerMergingCallback``: merge layers in ``setup("fit")``, before optimizers exist.

Lightning 2.6.6 ``Trainer._run`` order: ``setup`` hooks (datamodule, callbacks, module) ->
``configure_model`` -> restore the module's state dict from ``ckpt_path`` -> strategy set-up
(DDP wrap, ``configure_optimizers``) -> restore optimizer/loop state. So this callback calls
the module's idempotent ``configure_model`` itself, then either

- **fresh run**: merges the student with calibration blocks from the DataModule
  (``calibration_blocks()``; the same seeded blocks on every rank, so every rank takes the same
  decision, which is checked against rank 0), writes ``decisions.json``, or
- **resumed run** (a ``ckpt_path`` given to ``fit``, see :mod:`lightning_prune.callbacks.resume`): reads the merge groups stored in the checkpoint
  and rebuilds the merged architecture, so the state dict loaded next fits it.

The module then gets the groups (``set_groups``), which unfreezes the merged layers only.
"""

import lightning as L
import torch

from lightning_prune.callbacks.resume import pending_checkpoint_path
from lightning_prune.errors import InputError, MissingInputError
from lightning_prune.merging.methods import check_merge_request, merge_model
from lightning_prune.merging.progressive import MergeRecord, check_groups, rebuild_merged_architecture
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.results import RunDirectory

__all__ = ["LayerMergingCallback", "read_checkpoint_groups"]

CHECKPOINT_KEY = "merge_groups"


def read_checkpoint_groups(path: str, depth: int) -> list[list[int]]:
    """Merge groups stored in a Lightning checkpoint, checked against the original ``depth``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as error:
        raise MissingInputError(f"checkpoint {path!r} does not exist") from error
    groups = checkpoint.get(CHECKPOINT_KEY)
    if not groups:
        raise InputError(f"checkpoint {path!r} holds no layer-merge groups; it was not written by a merged distillation run")
    return check_groups(groups, depth)


class LayerMergingCallback(L.Callback):
    """Merge ``num_layers`` layers of the student away at the start of ``fit`` (paper 004 Alg. 1/2).

    Args:
        num_layers: decoder layers to remove by merging (the target depth is depth - num_layers).
        method: ``come``, ``come_p`` or ``sum``.
        p: skew exponent of the retention ratios (> 0).
        rho: minimum retention of the dominant layer, in [0, 1).
        remerge: allow merging an already merged layer again.
        grid: CoMe-P grid size n.
        calibration_batch_size: calibration blocks per forward.
        output_dir: where ``decisions.json`` goes (default: ``trainer.default_root_dir``).
    """

    def __init__(
        self,
        num_layers: int,
        method: str = "come",
        p: float = 1.0,
        rho: float = 0.0,
        remerge: bool = True,
        grid: int = 20,
        calibration_batch_size: int = 8,
        output_dir: str | None = None,
    ):
        self.num_layers, self.method, self.p, self.rho = num_layers, method, p, rho
        self.remerge, self.grid, self.calibration_batch_size = remerge, grid, calibration_batch_size
        self.output_dir = output_dir
        self.record: MergeRecord | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pl_module.configure_model()
        if getattr(pl_module, "groups", None):
            return
        checkpoint_path = pending_checkpoint_path(trainer)
        if checkpoint_path:
            groups = read_checkpoint_groups(checkpoint_path, Anatomy(pl_module.model).num_layers)
            rebuild_merged_architecture(pl_module.model, groups)
            pl_module.set_groups(groups)
            return
        self._merge(trainer, pl_module)

    def _calibration_batches(self, trainer: L.Trainer) -> list[torch.Tensor]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "calibration_blocks"):
            raise InputError("LayerMergingCallback needs a DataModule with calibration_blocks(), e.g. lightning_prune.data.datamodule.TextDataModule")
        blocks = datamodule.calibration_blocks()
        return list(blocks.split(self.calibration_batch_size))

    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        target_depth = check_merge_request(model.config, self.method, self.num_layers, self.p, self.rho)
        batches = self._calibration_batches(trainer)
        self.record = merge_model(
            model, batches, target_depth, method=self.method, p=self.p, rho=self.rho,
            remerge=self.remerge, grid=self.grid, progress=trainer.is_global_zero,
        )
        reference = trainer.strategy.broadcast(self.record.groups, src=0)
        if reference != self.record.groups:
            raise RuntimeError(f"rank {trainer.global_rank} merged {self.record.groups}, rank 0 merged {reference}")
        pl_module.set_groups(self.record.groups)
        if trainer.is_global_zero:
            settings = {"num_layers": self.num_layers, "method": self.method, "p": self.p, "rho": self.rho, "remerge": self.remerge, "grid": self.grid}
            RunDirectory(self.output_dir or trainer.default_root_dir, overwrite=True).write_json(
                "decisions.json", {"merge": self.record.to_dict(), "settings": settings}
            )

    def state_dict(self) -> dict:
        return {"record": self.record.to_dict() if self.record else None}
