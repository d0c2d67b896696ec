"""``HealingModule``: heal a pruned model with LoRA, or QLoRA with ``quantize: nf4``.

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
plain full-precision copy (QLoRA: into the dequantised base), saved as a Hugging Face model in
``save_dir/model`` and the adapter alone in ``save_dir/adapter``.
"""

import importlib.util
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lightning_prune.errors import InputError
from lightning_prune.model.loading import DTYPES
from lightning_prune.modules.causal_lm import CausalLMModule

__all__ = [
    "QUANTIZE_TYPES",
    "PAPER_TARGETS",
    "HealingModule",
    "linear_module_names",
    "check_lora_targets",
    "check_bitsandbytes",
    "dequantized_weight",
    "model_fingerprint",
    "quantize_model",
    "attach_adapters",
    "adapter_parameter_count",
    "merged_copy",
]

QUANTIZE_TYPES = ("nf4", "fp4")
PAPER_TARGETS = ("gate_proj", "up_proj", "down_proj")  # paper 002 App. E.7 "applied modules"
CHECKPOINT_KEY = "healing_model"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted distinct leaf names of the linear layers LoRA may target (``lm_head`` excluded)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    return sorted(names - {"lm_head"})


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must name at least one linear layer; the error lists the names available."""
    available = linear_module_names(model)
    missing = [target for target in targets if target not in available]
    if not targets or missing:
        raise InputError(
            f"LoRA target_modules {missing or targets} match no linear module of this model; "
            f"its linear modules are: {', '.join(available)}"
        )


def check_bitsandbytes(quantize: str | None) -> None:
    """``quantize`` must be None or a known 4-bit type, and bitsandbytes must be importable."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_TYPES:
        raise InputError(f"quantize {quantize!r} is not known; choose one of {', '.join(QUANTIZE_TYPES)} or leave it unset for LoRA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"quantize: {quantize} (QLoRA) needs the bitsandbytes package, which is not installed; "
                         "install bitsandbytes or leave quantize unset for plain LoRA")


def quantize_model(model: nn.Module, *, quant_type: str, compute_dtype: str, double_quant: bool) -> nn.Module:
    """4-bit copy of a (pruned) Hugging Face model via ``BitsAndBytesConfig`` (QLoRA, Dettmers 2023).

    The model is saved to a temporary directory and reloaded with the quantisation config,
    the one path transformers supports for turning full-precision weights into 4-bit ones.
    """
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )
    with tempfile.TemporaryDirectory(prefix="lightning-prune-qlora-") as directory:
        model.save_pretrained(directory, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=DTYPES[compute_dtype])
    for module in quantized.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes 0.50 would repack weights for a bf16 CPU kernel at the first eval forward;
            # keep one layout so eval, training and the dequantised merge all use the same weights.
            module.support_avx512bf16_for_cpu = False
    return quantized.train()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """Full-precision weight (out, in) of a linear layer, dequantising 4-bit ones (fp32)."""
    weight = getattr(module, "weight", None)
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return dequantize_module_weight(module).detach().float()


def attach_adapters(model: nn.Module, lora: LoraConfig, *, quantized: bool, gradient_checkpointing: bool) -> PeftModel:
    """Freeze the base and wrap it with LoRA adapters; only adapter parameters train."""
    check_lora_targets(model, list(lora.target_modules))
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def adapter_parameter_count(model: nn.Module, rank: int) -> int:
    """Expected number of LoRA parameters: r x (in + out) summed over every adapted linear layer."""
    return sum(rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLayer))


def _merged_weight(layer: LoraLayer) -> torch.Tensor:
    """Dequantised base weight plus every active adapter's delta (B A scaled), in fp32. (out, in)"""
    weight = dequantized_weight(layer.get_base_layer())
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).float()
    return weight


def merged_copy(peft_model: PeftModel, dtype: str = "float32") -> nn.Module:
    """A plain Hugging Face model whose linear layers are base (dequantised) + LoRA delta.

    Nothing is merged in place, so training can continue; 4-bit weights are dequantised
    before the exact fp32 merge (never re-quantised), which is how QLoRA adapters are merged
    into "a dequantised copy".
    """
    base = peft_model.get_base_model()
    replaced: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            replaced[name] = _merged_weight(module)
        elif _is_linear(module) and not any(name.startswith(p + ".") for p in replaced):
            replaced[name] = dequantized_weight(module)
    state = {}
    for key, value in base.state_dict().items():
        owner = next((p for p in replaced if key.startswith(p + ".")), None)
        if owner is None:
            state[key] = value
        elif key.endswith("base_layer.bias") or key == f"{owner}.bias":
            state[f"{owner}.bias"] = value
    state.update({f"{name}.weight": weight for name, weight in replaced.items()})
    config = base.config.__class__.from_dict({k: v for k, v in base.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    plain.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, strict=True)
    plain.tie_weights()
    return plain.to(next(peft_model.parameters()).device).eval()


def model_fingerprint(config) -> dict:
    """What identifies the original (unpruned) model a healing checkpoint was written for."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {key: getattr(config, key, None) for key in keys}


class HealingModule(CausalLMModule):
    """LoRA / QLoRA healing of a (pruned) causal LM (paper 002 App. E.7).

    Training batches are token blocks (B, T); the loss is the causal-LM cross-entropy and
    validation logs ``val_perplexity`` (see :class:`CausalLMModule`).

    Args:
        model: 'demo', a Hub id, a local model directory or a .gguf file.
        dtype: weight dtype of the loaded model and of the merged model that is saved.
        lora_rank: LoRA rank r (paper 002: 2).
        lora_alpha: LoRA alpha; the update is scaled by alpha / r (paper 002: 2).
        lora_dropout: dropout on the adapter input (paper 002: 0.05).
        target_modules: linear layer names that get adapters (paper 002: gate/up/down projections).
        quantize: ``nf4`` (or ``fp4``) for QLoRA 4-bit base weights; unset for plain LoRA.
        compute_dtype: QLoRA compute dtype (float32 on CPU, bfloat16 on recent GPUs).
        double_quant: QLoRA double quantisation of the quantisation constants.
        gradient_checkpointing: recompute activations in backward (saves memory, costs time).
        learning_rate: peak AdamW learning rate (paper 002: 3e-4).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up optimizer steps before the cosine decay (paper 002: 100).
        save_dir: if set, ``model/`` (merged, plain Hugging Face) and ``adapter/`` are saved there.
    """

    def __init__(
        self,
        model: str = "demo",
        dtype: str = "float32",
        lora_rank: int = 2,
        lora_alpha: float = 2.0,
        lora_dropout: float = 0.05,
        target_modules: list[str] = list(PAPER_TARGETS),
        quantize: str | None = None,
        compute_dtype: str = "float32",
        double_quant: bool = True,
        gradient_checkpointing: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        save_dir: str | None = None,
    ):
        if lora_rank <= 0:
            raise InputError(f"lora_rank {lora_rank} must be a positive integer (paper 002 uses 2)")
        if not 0 <= lora_dropout < 1:
            raise InputError(f"lora_dropout {lora_dropout} must be in [0, 1)")
        if compute_dtype not in DTYPES:
            raise InputError(f"compute_dtype {compute_dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        check_bitsandbytes(quantize)
        super().__init__(model=model, dtype=dtype, learning_rate=learning_rate, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, save_dir=save_dir)
        self.save_hyperparameters()
        self.fingerprint: dict | None = None
        self.strict_loading = quantize is None  # QLoRA: the 4-bit base is rebuilt, not loaded (keys checked on load)

    def configure_model(self) -> None:
        """Load the dense model once (no adapters yet: callbacks may still prune it)."""
        if self.model is None:
            super().configure_model()
            self.fingerprint = model_fingerprint(self.model.config)

    def lora_config(self) -> LoraConfig:
        hp = self.hparams
        return LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                          target_modules=list(hp.target_modules), bias="none", task_type="CAUSAL_LM")

    def setup(self, stage: str) -> None:
        """After the callbacks' ``setup`` (pruning): quantise (QLoRA) and attach adapters, once."""
        self.configure_model()
        if isinstance(self.model, PeftModel):
            return
        hp = self.hparams
        check_lora_targets(self.model, list(hp.target_modules))
        model = self.model
        if hp.quantize:
            model = quantize_model(model, quant_type=hp.quantize, compute_dtype=hp.compute_dtype, double_quant=hp.double_quant)
        self.model = attach_adapters(model, self.lora_config(), quantized=bool(hp.quantize),
                                     gradient_checkpointing=hp.gradient_checkpointing)
        self.model.peft_config["default"].base_model_name_or_path = hp.model  # before pruning; see docs/healing.md
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        expected = adapter_parameter_count(self.model, hp.lora_rank)
        assert trainable == expected, f"{trainable} trainable parameters, expected {expected} (LoRA adapters only)"

    def export_model(self) -> nn.Module:
        """The merged plain Hugging Face model (adapters folded into a full-precision copy)."""
        return merged_copy(self.model, self.hparams.dtype)

    def on_fit_end(self) -> None:
        """Save ``model/`` (merged) and, separately, ``adapter/`` (peft format) on rank 0."""
        super().on_fit_end()
        if self.hparams.save_dir and self.trainer.is_global_zero:
            from lightning_prune.results import RunDirectory

            RunDirectory(self.hparams.save_dir, overwrite=True).save_model(self.model, name="adapter")

    def _rebuilt_keys(self) -> list[str]:
        """State-dict keys of 4-bit modules: rebuilt from the original model, never checkpointed."""
        prefixes = [name + "." for name, m in self.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
        return [key for key in self.state_dict() if any(key.startswith(p) for p in prefixes)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store which model this is; leave out the 4-bit base (QLoRA rebuilds it on resume)."""
        checkpoint[CHECKPOINT_KEY] = {"model": self.hparams.model, "fingerprint": self.fingerprint}
        dropped = set(self._rebuilt_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in dropped}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model or architecture before any weight is loaded."""
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            raise InputError("checkpoint was not written by HealingModule; resume only from a healing run's checkpoint")
        if stored["fingerprint"] != self.fingerprint:
            raise InputError(f"checkpoint is from model {stored['model']!r} {stored['fingerprint']}, "
                             f"but this run heals {self.hparams.model!r} {self.fingerprint}; pass the checkpoint of this model")
        rebuilt = set(self._rebuilt_keys())
        live = {k: tuple(v.shape) for k, v in self.state_dict().items() if k not in rebuilt}
        shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        wrong = sorted(set(shapes) ^ set(live)) + sorted(k for k in set(shapes) & set(live) if shapes[k] != live[k])
        if wrong:
            raise InputError(f"checkpoint does not fit this run's architecture ({len(wrong)} mismatched tensors, first "
                             f"{wrong[0]!r}); it was written with other pruning/LoRA settings")
