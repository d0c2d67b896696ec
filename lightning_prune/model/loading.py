"""One entry point from a model name to ``(model, tokenizer)``.

Accepted names: ``demo`` (the embedded SmolLM2-135M-Instruct GGUF), a local Hugging Face
directory, a ``.gguf`` file, or a Hugging Face Hub id. All go through the same
``from_pretrained``; GGUF weights are dequantised to the requested dtype.
"""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lightning_prune.errors import InputError, MissingInputError
from lightning_prune.model.anatomy import family_spec
from lightning_prune.model.demo import demo_gguf_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "ModelSource",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_source",
    "load_config",
    "sparse_export",
    "load_model",
    "load_tokenizer",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``/``cuda:N`` or ``mps``, checked to exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise InputError(f"--device {name!r} is not available here ({count} CUDA devices); use --device auto or cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name!r} is not available here; use --device auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto`` (bfloat16 on a CUDA device that supports it, else float32) or an explicit dtype the device can run."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r} is not supported; choose auto or one of {', '.join(DTYPES)}")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--dtype bfloat16 is not supported by {device}; use --dtype float16 or auto")
    return name


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should look: a directory or Hub id, plus an optional GGUF file name."""

    name_or_path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def resolve_model_source(name: str) -> ModelSource:
    """Turn a user-facing model name into a :class:`ModelSource`, checking local paths exist."""
    if name == "demo":
        path = demo_gguf_path()
        return ModelSource(str(path.parent), path.name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingInputError(f"model directory {name!r} has no config.json; pass a Hugging Face model directory")
        return ModelSource(str(path))
    if path.exists():
        raise InputError(f"model file {name!r} is not a .gguf file; pass 'demo', a Hub id, a model directory or a .gguf file")
    if _looks_like_path(name):
        raise MissingInputError(f"model path {name!r} does not exist; pass 'demo', a Hub id, a model directory or a .gguf file")
    return ModelSource(name)


def _as_plain_model(model) -> None:
    """Forget the GGUF "quantizer": its weights are already dequantised, so the model is a
    plain dense model that ``save_pretrained`` must write as such."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def sparse_export(config) -> bool:
    """Whether a config describes a compressed-tensors sparse bitmask export (``sparsify --export_format compressed``)."""
    quantization = getattr(config, "quantization_config", None)
    quantization = quantization if isinstance(quantization, dict) else getattr(quantization, "to_dict", dict)()
    return str((quantization.get("sparsity_config") or {}).get("format", "")).startswith("sparse-")


_CONFIGS: dict[tuple, object] = {}


def _config_key(source: ModelSource, trust_remote_code: bool) -> tuple:
    """What a loaded config depends on: the source, and for local files their size and modification time."""
    path = Path(source.name_or_path) / (source.gguf_file or "config.json")
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    return source.name_or_path, source.gguf_file, trust_remote_code, stamp


def load_config(name: str, *, trust_remote_code: bool = False):
    """Load and check the config of a model: the family must be supported.

    A command reads the config several times before it loads weights (checks, stages, loading);
    reading a GGUF file's metadata takes seconds, so each source's config is read once (a changed
    local file is read again) and every caller gets its own copy.
    """
    from transformers import AutoConfig

    source = resolve_model_source(name)
    key = _config_key(source, trust_remote_code)
    if key not in _CONFIGS:
        try:
            config = AutoConfig.from_pretrained(source.name_or_path, trust_remote_code=trust_remote_code, **source.kwargs())
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"could not load model {name!r}: {first_line}") from error
        family_spec(config)
        _CONFIGS[key] = config
    return copy.deepcopy(_CONFIGS[key])


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """Load the tokenizer of a model; a missing pad token is set to the EOS token."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, trust_remote_code=trust_remote_code, **source.kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(source: "ModelSource", config, dtype: torch.dtype, trust_remote_code: bool, quantization_config):
    """``AutoModelForCausalLM.from_pretrained``, without the per-tensor GGUF de-quantisation bar."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if source.gguf_file:
        hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(
            source.name_or_path,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            quantization_config=quantization_config,
            **source.kwargs(),
        )
    finally:
        if was_enabled:  # a user who turned the bars off keeps them off
            hf_logging.enable_progress_bar()


def load_model(
    name: str = "demo",
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    quantization_config=None,
):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name: ``demo``, a local HF directory, a ``.gguf`` file or a Hub id.
        dtype: one of ``float32``, ``bfloat16``, ``float16``.
        device: where to put the weights.
        trust_remote_code: allow custom modelling code from the model's repository.
        quantization_config: e.g. a ``BitsAndBytesConfig`` for 4-bit base weights.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    config = load_config(name, trust_remote_code=trust_remote_code)
    source = resolve_model_source(name)
    if sparse_export(config):  # transformers 5 would leave the compressed projections uninitialised
        if not Path(source.name_or_path).is_dir():
            raise InputError(f"{name!r} is a compressed-tensors sparse export; download it first (hf download {name} --local-dir DIR)")
        from lightning_prune.sparsity.compressed import load_compressed

        model = load_compressed(source.name_or_path, DTYPES[dtype])
    else:
        model = _from_pretrained(source, config, DTYPES[dtype], trust_remote_code, quantization_config)
    if source.gguf_file:
        _as_plain_model(model)
    if quantization_config is None:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    return model, tokenizer
