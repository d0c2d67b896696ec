"""``SparsifyCallback``: sparsify the model before training and keep it sparse while it trains.

When: ``setup("fit")`` — after ``configure_model`` (called here, it is idempotent) and before
``configure_optimizers`` — runs :func:`sparsify` on calibration blocks. Under DDP every rank
draws the same seeded blocks and computes the same masks; rank 0's per-layer sparsities are
broadcast and compared so a mismatch fails loudly.

How the zeros are kept (the choice, and why):

- ``on_before_optimizer_step`` zeroes the gradients of pruned weights, so Adam's moments
  stay zero there and the optimizer never pushes them;
- ``on_train_batch_end`` multiplies the weights by their masks again, which makes the zeros
  exact whatever the optimizer does (decoupled weight decay, momentum from elsewhere, eps).

Both are plain in-place multiplications on the weights the model already has: no
parametrization and no renamed parameters, so ``save_pretrained``, peft and checkpoints see
ordinary tensors. With LoRA the base weights are frozen (and stay sparse); the adapter delta
``BA`` is dense, so after ``merge_and_unload`` call :func:`remask_merged` (or ``apply_masks``).

Checkpoints: masks (bool) and decisions go into ``checkpoint["sparsify"]``
(``on_save_checkpoint``). On resume ``on_load_checkpoint`` (which Lightning calls after
``setup`` and ``configure_model``, before the optimizers) restores them and re-applies them
to the restored weights, so the checkpoint's decisions win; ``setup`` skips calibration when
``fit`` is about to restore a checkpoint (:mod:`lightning_prune.callbacks.resume`).
"""

import lightning as L
import torch

from lightning_prune.callbacks.resume import pending_checkpoint_path
from lightning_prune.data.text import load_blocks
from lightning_prune.sparsity.allocation import check_allocation
from lightning_prune.sparsity.masks import apply_masks, mask_gradients, measure_sparsity
from lightning_prune.sparsity.nm import check_mixed, parse_pattern, resolve_sparsity
from lightning_prune.sparsity.sequential import check_method, sparsify

__all__ = ["SparsifyCallback", "remask_merged"]

CHECKPOINT_KEY = "sparsify"


def remask_merged(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Re-apply masks to a model after ``merge_and_unload`` folded dense LoRA deltas into it."""
    apply_masks(model, masks)
    return model


class SparsifyCallback(L.Callback):
    """Prune the LightningModule's ``model`` to a target sparsity before fitting (003 Algorithm 1).

    Args:
        method: magnitude, wanda or sparsegpt.
        allocation: uniform, owl or dlp.
        sparsity: target fraction of pruned weights in [0, 1) (default 0.5; with ``structure``: 1 − N/M).
        alpha: DLP's α / OWL's λ (default per allocation: dlp 0.15, owl 0.08).
        structure: N:M pattern such as 2:4 (mixed N:M with owl/dlp); empty for unstructured.
        data: calibration source (c4, wikitext2 or a text/jsonl file), validation split.
        calibration_samples: calibration blocks.
        seq_len: tokens per calibration block.
        seed: seed for drawing the calibration blocks.
        batch_size: calibration blocks per forward.
        model_attribute: the LightningModule attribute holding the Hugging Face (or peft) model.
    """

    def __init__(
        self,
        method: str = "wanda",
        allocation: str = "dlp",
        sparsity: float | None = None,
        alpha: float | None = None,
        structure: str | None = None,
        data: str = "c4",
        calibration_samples: int = 128,
        seq_len: int = 128,
        seed: int = 0,
        batch_size: int = 8,
        model_attribute: str = "model",
    ):
        check_method(method)
        self.pattern = parse_pattern(structure)
        self.sparsity = resolve_sparsity(sparsity, self.pattern)
        self.alpha = check_allocation(allocation, self.sparsity, alpha)
        if self.pattern and allocation != "uniform":
            check_mixed(self.pattern)
        self.method, self.allocation = method, allocation
        self.data, self.calibration_samples, self.seq_len, self.seed = data, calibration_samples, seq_len, seed
        self.batch_size, self.model_attribute = batch_size, model_attribute
        self.masks: dict[str, torch.Tensor] | None = None
        self.decisions: dict | None = None

    def _model(self, pl_module) -> torch.nn.Module:
        return getattr(pl_module, self.model_attribute)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.masks is not None:
            return
        pl_module.configure_model()
        if pending_checkpoint_path(trainer):
            return
        blocks = load_blocks(
            pl_module.tokenizer, self.data, split="validation", seq_len=self.seq_len,
            num_samples=self.calibration_samples, seed=self.seed,
        )
        result = sparsify(
            self._model(pl_module), blocks.to(pl_module.device), method=self.method, allocation=self.allocation,
            sparsity=self.sparsity, alpha=self.alpha, pattern=self.pattern, batch_size=self.batch_size,
        )
        reference = trainer.strategy.broadcast(result.layer_sparsity, src=0)
        if reference != result.layer_sparsity:
            raise RuntimeError("ranks computed different per-layer sparsities; calibration must be identical")
        self.masks = result.masks
        self.decisions = {
            "method": self.method, "allocation": self.allocation, "alpha": self.alpha,
            "layer_sparsity": result.layer_sparsity, "layer_patterns": result.layer_patterns,
            "measured": measure_sparsity(self._model(pl_module)),
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.masks:
            mask_gradients(self._model(pl_module), self.masks)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.masks:
            apply_masks(self._model(pl_module), self.masks)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"masks": self.masks, "decisions": self.decisions}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state and state["masks"] is not None:
            self.masks, self.decisions = state["masks"], state["decisions"]
            apply_masks(self._model(pl_module), self.masks)
