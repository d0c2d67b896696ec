"""``CausalLMModule``: a Hugging Face causal LM trained with the next-token loss.

The base of every training stage. The model is loaded by name in :meth:`configure_model`
(idempotent), so :class:`~lightning_prune.callbacks.stage.StageCallback` (which changes the
architecture in ``setup("fit")``) calls it first and optimizers only ever see the final
architecture; the decisions it applied arrive through :meth:`receive_decisions`. Saving the
model is the callback's job (it knows the decisions' export fix-ups). Subclasses decide which parameters
train (:meth:`trainable_parameters`) and how the model is wrapped (:meth:`prepare_model`).

Checkpoints are slim (:mod:`lightning_prune.modules.slim`): frozen parameters (a LoRA base, a
teacher, the layers a distillation keeps fixed) are left out and rebuilt on resume from the
model source and the stage decisions; the module checks the key set itself, so Lightning loads
the state dict non-strictly.
"""

import lightning as L
import torch
from torchmetrics.text import Perplexity

from lightning_prune.errors import InputError
from lightning_prune.model.loading import load_model, resolve_device, resolve_dtype
from lightning_prune.modules.optim import adamw_cosine
from lightning_prune.modules.slim import check_fits, drop_frozen, frozen_keys
from lightning_prune.stages.plan import checkpoint_decisions, same_decisions

__all__ = ["CausalLMModule"]


class CausalLMModule(L.LightningModule):
    """Next-token training of a causal LM; validation logs ``val_perplexity``.

    Args:
        model: 'demo', a Hub id, a local model directory or a .gguf file.
        dtype: weight dtype: auto (bfloat16 when the trainer runs on a CUDA device that supports it,
            else float32), float32, bfloat16 or float16.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
    """

    def __init__(
        self,
        model: str = "demo",
        dtype: str = "auto",
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self.decisions: list = []
        self.val_perplexity = Perplexity()
        self.strict_loading = False  # slim checkpoints: on_load_checkpoint checks the keys instead

    def configure_model(self) -> None:
        """Load the model once; later calls are no-ops."""
        if self.model is not None:
            return
        model, self.tokenizer = load_model(self.hparams.model, dtype=self.resolved_dtype(self.hparams.dtype))
        self.model = self.prepare_model(model.train())

    def resolved_dtype(self, name: str) -> str:
        """``auto`` -> bfloat16 on the trainer's CUDA device when it supports it, else float32; others as given."""
        try:
            device = self.trainer.strategy.root_device
        except RuntimeError:  # not attached to a Trainer (e.g. built in a test): where a run would go
            device = resolve_device("auto")
        return resolve_dtype(name, device)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Hook for subclasses (e.g. wrap with LoRA); the base trains the model as it is."""
        return model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters handed to the optimizer."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: torch.Tensor, batch_index: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_index: int) -> None:
        logits = self(batch).float()
        self.val_perplexity.update(logits[:, :-1], batch[:, 1:])
        self.log("val_perplexity", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self) -> dict:
        return adamw_cosine(
            self.trainable_parameters(),
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=self.trainer.estimated_stepping_batches,
        )

    def export_model(self) -> torch.nn.Module:
        """The plain Hugging Face model to save (subclasses merge adapters here)."""
        return self.model

    def receive_decisions(self, decisions: list) -> None:
        """The stage decisions applied to ``self.model`` (from ``StageCallback.setup``)."""
        self.decisions = list(decisions)

    def rebuilt_keys(self) -> list[str]:
        """State-dict keys rebuilt on resume instead of checkpointed: the frozen parameters."""
        return frozen_keys(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what trains (and the buffers); record the model source the rest comes from."""
        drop_frozen(checkpoint, self.rebuilt_keys(), self.hparams.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, before any weight loads, a checkpoint of other decisions or that does not fit the module."""
        stored = checkpoint_decisions(checkpoint)
        if stored is not None and not same_decisions(stored, self.decisions):
            raise InputError(
                f"checkpoint was written after {[d.summary() for d in stored]} but this run applied "
                f"{[d.summary() for d in self.decisions] or 'no stages'}; resume through StageCallback(resume_from=<checkpoint>) "
                "(the CLI does this for --ckpt_path)"
            )
        check_fits(checkpoint, self.state_dict(), self.rebuilt_keys())
