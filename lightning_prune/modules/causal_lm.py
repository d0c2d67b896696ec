"""``CausalLMModule``: a Hugging Face causal LM trained with the next-token loss.

The base of every training stage. The model is loaded by name in :meth:`configure_model`
(idempotent), so callbacks that change the architecture in ``setup("fit")`` call it first
and optimizers only ever see the final architecture. Subclasses decide which parameters
train (:meth:`trainable_parameters`) and how the model is wrapped (:meth:`prepare_model`).
"""

import lightning as L
import torch
from torchmetrics.text import Perplexity

from lightning_prune.model.loading import load_model
from lightning_prune.modules.optim import adamw_cosine

__all__ = ["CausalLMModule"]


class CausalLMModule(L.LightningModule):
    """Next-token training of a causal LM; validation logs ``val_perplexity``.

    Args:
        model: 'demo', a Hub id, a local model directory or a .gguf file.
        dtype: weight dtype (float32, bfloat16, float16).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        save_dir: if set, the final model is saved there (Hugging Face format) at the end of fit.
    """

    def __init__(
        self,
        model: str = "demo",
        dtype: str = "float32",
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        save_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self.val_perplexity = Perplexity()

    def configure_model(self) -> None:
        """Load the model once; later calls are no-ops."""
        if self.model is not None:
            return
        model, self.tokenizer = load_model(self.hparams.model, dtype=self.hparams.dtype)
        self.model = self.prepare_model(model.train())

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

    def on_fit_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            from lightning_prune.results import RunDirectory

            RunDirectory(self.hparams.save_dir, overwrite=True).save_model(self.export_model(), self.tokenizer)
