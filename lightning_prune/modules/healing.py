"""``HealingModule``: heal a pruned model with LoRA, QLoRA with ``quantize: nf4``, or every weight with ``finetune: full``.

Paper 002 App. E.7: after pruning, fine-tune LoRA adapters (peft) on the MLP projections
``[gate_proj, up_proj, down_proj]`` with rank 2, alpha 2, dropout 0.05, peak learning rate
3e-4, cosine schedule, 100 warm-up steps, batch size 16 (here: ``batch_size x
accumulate_grad_batches x devices``); the base weights may be 4-bit NF4 (QLoRA, bitsandbytes,
double quantisation). Those are the defaults below; every one is a constructor argument.

Order inside one ``fit`` (see :mod:`lightning_prune.callbacks`): ``configure_model`` loads the
dense model; pruning/compensation callbacks change it in their ``setup("fit")``; this
module's ``setup`` then (optionally) quantises the result and attaches the adapters, so the
checkpoint restore, the DDP wrapper and ``configure_optimizers`` all see the final adapted
architecture. Only adapter parameters train. At the end of fit the adapters are merged into a
plain full-precision copy (QLoRA: into the dequantised base); ``StageCallback`` saves it as
``run_dir/model`` and the adapter alone as ``run_dir/adapter``. The LoRA plumbing itself is
Lightning-free, in :mod:`lightning_prune.lora`.

``finetune: full`` attaches no adapters: every decoder weight (and the final norm) trains, the
embeddings too with ``train_embeddings: true`` (with tied embeddings that is the LM head as
well). Minitron heals its depth-pruned models this way, on the teacher's logits; pair it with
``distill`` and a learning rate about ten times below LoRA's. The saved model is the trained
model itself.
"""

import copy
from dataclasses import asdict

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.fsdp import check_fsdp
from lightning_prune.lora import (
    PAPER_TARGETS,
    adapter_parameter_count,
    attach_adapters,
    check_bitsandbytes,
    check_lora_targets,
    merged_copy,
    model_fingerprint,
    quantize_model,
)
from lightning_prune.model.loading import DTYPES, load_model
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.sparsity.masks import unwrap_model
from lightning_prune.teacher import TeacherDistillation, final_hidden, head_losses

__all__ = ["HealingModule", "FINETUNE_MODES"]

CHECKPOINT_KEY = "healing_model"
FINETUNE_MODES = ("lora", "full")


def _is_bitsandbytes_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4/8-bit linear (not peft's LoRA wrapper of the same class name)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit", "Linear8bitLt")


class HealingModule(CausalLMModule):
    """LoRA / QLoRA (paper 002 App. E.7) or full-parameter healing of a (pruned) causal LM.

    Training batches are token blocks (B, T); the loss is the causal-LM cross-entropy and
    validation logs ``val_perplexity`` (see :class:`CausalLMModule`).

    Args:
        model: 'demo', a Hub id, a local model directory or a .gguf file.
        dtype: weight dtype of the loaded model and of the merged model that is saved (auto: bfloat16
            on a CUDA device that supports it, else float32).
        lora_rank: LoRA rank r (paper 002: 2).
        lora_alpha: LoRA alpha; the update is scaled by alpha / r (paper 002: 2).
        lora_dropout: dropout on the adapter input (paper 002: 0.05).
        target_modules: linear layer names that get adapters (paper 002: gate/up/down projections).
        quantize: ``nf4`` (or ``fp4``) for QLoRA 4-bit base weights; unset for plain LoRA.
        compute_dtype: QLoRA compute dtype (auto: bfloat16 on a CUDA device that supports it, else float32).
        double_quant: QLoRA double quantisation of the quantisation constants.
        gradient_checkpointing: recompute activations in backward (saves memory, costs time).
        learning_rate: peak AdamW learning rate (paper 002: 3e-4).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up optimizer steps before the cosine decay (paper 002: 100).
        distill: heal on the logits of a frozen teacher (the dense model before the stages by
            default; Minitron-style forward KL) instead of, or mixed with, the LM loss; unset: LM loss.
        finetune: ``lora`` (adapters; the LoRA/QLoRA options above apply) or ``full`` (no adapters:
            every decoder weight trains; ``quantize`` must be unset).
        train_embeddings: with ``finetune: full``, the input embeddings (and a tied LM head) train too;
            false keeps them frozen (an untied LM head still trains).
    """

    def __init__(
        self,
        model: str = "demo",
        dtype: str = "auto",
        lora_rank: int = 2,
        lora_alpha: float = 2.0,
        lora_dropout: float = 0.05,
        target_modules: list[str] = list(PAPER_TARGETS),
        quantize: str | None = None,
        compute_dtype: str = "auto",
        double_quant: bool = True,
        gradient_checkpointing: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        distill: TeacherDistillation | None = None,
        finetune: str = "lora",
        train_embeddings: bool = False,
    ):
        if lora_rank <= 0:
            raise InputError(f"lora_rank {lora_rank} must be a positive integer (paper 002 uses 2)")
        if not 0 <= lora_dropout < 1:
            raise InputError(f"lora_dropout {lora_dropout} must be in [0, 1)")
        if compute_dtype != "auto" and compute_dtype not in DTYPES:
            raise InputError(f"compute_dtype {compute_dtype!r} is not supported; choose auto or one of {', '.join(DTYPES)}")
        if finetune not in FINETUNE_MODES:
            raise InputError(f"finetune {finetune!r} is not known; choose one of {', '.join(FINETUNE_MODES)}")
        if finetune == "full" and quantize:
            raise InputError(
                f"finetune: full trains every weight and cannot use a {quantize} base; leave quantize unset or use finetune: lora"
            )
        check_bitsandbytes(quantize)
        if isinstance(distill, dict):  # hyper-parameters of a checkpoint store it as plain data
            distill = TeacherDistillation(**distill)
        if distill is not None:
            check_bitsandbytes(distill.quantize)
        super().__init__(model=model, dtype=dtype, learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        self.distill = distill
        self.hparams.distill = asdict(distill) if distill is not None else None  # plain data: checkpoints load weights_only
        self.fingerprint: dict | None = None
        self.teacher: nn.Module | None = None

    def configure_model(self) -> None:
        """Load the dense model once (no adapters yet: the stages may still change it), and the teacher."""
        if self.model is None:
            self._check_strategy()
            super().configure_model()
            self.fingerprint = model_fingerprint(self.model.config)
            if self.distill is not None:
                self.teacher = self._load_teacher(self.distill)

    def _check_strategy(self) -> None:
        """Before any weight loads: a sharding strategy cannot take a 4-bit base or teacher."""
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # not attached to a Trainer
            return
        check_fsdp(strategy, self.hparams.quantize)
        if self.distill is not None:
            check_fsdp(strategy, self.distill.quantize, "distill quantize")

    def _load_teacher(self, distill: TeacherDistillation) -> nn.Module:
        """The frozen teacher: a copy of the dense model, or another model with the same vocabulary."""
        if distill.teacher == "original":
            teacher = copy.deepcopy(self.model)
        else:
            teacher = load_model(distill.teacher, dtype=self.resolved_dtype(self.hparams.dtype))[0]
            sizes = (teacher.config.vocab_size, self.model.config.vocab_size)
            if sizes[0] != sizes[1]:
                raise InputError(
                    f"distill teacher {distill.teacher!r} has a vocabulary of {sizes[0]} tokens, the student "
                    f"{sizes[1]}; logit distillation needs one vocabulary"
                )
        if distill.quantize:
            teacher = quantize_model(
                teacher, quant_type=distill.quantize, compute_dtype=self.resolved_dtype(self.hparams.compute_dtype), double_quant=True
            )
        return teacher.eval().requires_grad_(False)

    def lora_config(self) -> LoraConfig:
        hp = self.hparams
        return LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=list(hp.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def setup(self, stage: str) -> None:
        """After the callbacks' ``setup`` (pruning): quantise (QLoRA) and attach adapters, or unfreeze (full), once."""
        self.configure_model()
        hp = self.hparams
        if hp.finetune == "full":
            self._prepare_full()
            return
        if isinstance(self.model, PeftModel):
            return
        check_lora_targets(self.model, list(hp.target_modules))
        model = self.model
        if hp.quantize:
            model = quantize_model(
                model, quant_type=hp.quantize, compute_dtype=self.resolved_dtype(hp.compute_dtype), double_quant=hp.double_quant
            )
        self.model = attach_adapters(
            model, self.lora_config(), quantized=bool(hp.quantize), gradient_checkpointing=hp.gradient_checkpointing
        )
        self.model.peft_config["default"].base_model_name_or_path = hp.model  # before pruning; see docs/healing.md
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        expected = adapter_parameter_count(self.model, hp.lora_rank)
        assert trainable == expected, f"{trainable} trainable parameters, expected {expected} (LoRA adapters only)"

    def _prepare_full(self) -> None:
        """Full-parameter healing: every weight trains except the input embeddings (unless ``train_embeddings``); idempotent."""
        model = self.model
        model.requires_grad_(True)
        if not self.hparams.train_embeddings:
            model.get_input_embeddings().requires_grad_(False)  # a tied LM head shares this weight and stays frozen too
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable()

    def training_step(self, batch: torch.Tensor, batch_index: int) -> torch.Tensor:
        if self.distill is None:
            return super().training_step(batch, batch_index)
        loss, kd, _ = self.distillation_losses(batch)
        self.log_dict({"train_loss": loss, "train_kd": kd}, prog_bar=True)
        return loss

    def distillation_losses(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(training loss ``alpha x KL + (1 - alpha) x LM``, logit KL to the teacher, LM loss; the latter only
        when ``alpha < 1``) on one batch of blocks (B, T), from one chunked pass through the student's LM head
        (:func:`~lightning_prune.teacher.head_losses`)."""
        distill, student = self.distill, unwrap_model(self.model)
        self.teacher.eval()
        with torch.no_grad():
            teacher_hidden = final_hidden(self.teacher, batch)
        return head_losses(
            final_hidden(student, batch),
            student.get_output_embeddings(),
            teacher_hidden=teacher_hidden,
            teacher_head=self.teacher.get_output_embeddings(),
            input_ids=batch,
            alpha=distill.alpha,
            temperature=distill.temperature,
            loss=distill.loss,
            chunk_tokens=distill.chunk_tokens,
        )

    def export_model(self) -> nn.Module:
        """The plain Hugging Face model: adapters folded into a full-precision copy; ``full``: the trained model."""
        if self.hparams.finetune == "full":
            return self.model
        return merged_copy(self.model, self.resolved_dtype(self.hparams.dtype))

    def rebuilt_keys(self) -> list[str]:
        """Frozen parameters (base, teacher) and every state entry of 4-bit modules: rebuilt, never checkpointed."""
        prefixes = [name + "." for name, m in self.named_modules() if _is_bitsandbytes_linear(m)]
        quantized = [key for key in self.state_dict() if any(key.startswith(p) for p in prefixes)]
        return sorted(set(super().rebuilt_keys()) | set(quantized))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store which model this is; keep only the adapters (the base and the teacher are rebuilt on resume)."""
        checkpoint[CHECKPOINT_KEY] = {"model": self.hparams.model, "fingerprint": self.fingerprint}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model or architecture before any weight is loaded."""
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            raise InputError("checkpoint was not written by HealingModule; resume only from a healing run's checkpoint")
        if stored["fingerprint"] != self.fingerprint:
            raise InputError(
                f"checkpoint is from model {stored['model']!r} {stored['fingerprint']}, "
                f"but this run heals {self.hparams.model!r} {self.fingerprint}; pass the checkpoint of this model"
            )
        super().on_load_checkpoint(checkpoint)
