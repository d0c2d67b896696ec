"""LoRA / QLoRA plumbing without Lightning: quantise a model to 4-bit, attach adapters, merge a plain copy.

Paper 002 App. E.7 heals with LoRA on the MLP projections (rank 2, alpha 2, dropout 0.05),
optionally on a 4-bit NF4 base (QLoRA, bitsandbytes, double quantisation).
:class:`~lightning_prune.modules.healing.HealingModule` decides when these run.
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

__all__ = [
    "QUANTIZE_TYPES",
    "PAPER_TARGETS",
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
            f"LoRA target_modules {missing or targets} match no linear module of this model; its linear modules are: {', '.join(available)}"
        )


def check_bitsandbytes(quantize: str | None) -> None:
    """``quantize`` must be None or a known 4-bit type, and bitsandbytes must be importable."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_TYPES:
        raise InputError(f"quantize {quantize!r} is not known; choose one of {', '.join(QUANTIZE_TYPES)} or leave it unset for LoRA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            f"quantize: {quantize} (QLoRA) needs the bitsandbytes package, which is not installed; "
            "install bitsandbytes or leave quantize unset for plain LoRA"
        )


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
