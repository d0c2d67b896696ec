"""compressed-tensors export of a sparse model: ``sparse-bitmask`` or ``sparse-24-bitmask``.

The layout is compressed-tensors' sparse formats (the ones vLLM's compressed-tensors loader
reads): each sparse projection ``P.weight`` is stored as ``P.shape``, ``P.compressed`` (the
kept values), ``P.bitmask`` (bit-packed keep mask, little-endian bits per row) and, for
``sparse-bitmask``, ``P.row_offsets``; ``config.json`` gains a ``quantization_config`` with
``quant_method: compressed-tensors`` and the ``sparsity_config``. compressed-tensors provides
the config schema and the bit packing; from 0.15 on it no longer ships the sparse
compressors themselves (nor does transformers 5 decompress them), so the packing of the
weights is done here and :func:`load_compressed` reads such a directory back.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.sparsity.masks import prunable_linears, unwrap_model

__all__ = ["EXPORT_FORMATS", "INSTALL_HINT", "check_export_format", "save_compressed", "load_compressed"]

EXPORT_FORMATS = ("dense", "compressed")
INSTALL_HINT = "pip install 'lightning-prune[compressed]'"
BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
_PARTS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), BITMASK_24: ("shape", "compressed", "bitmask")}


def check_export_format(export_format: str) -> None:
    """``dense`` or ``compressed`` (which needs the compressed-tensors package), before any work."""
    if export_format not in EXPORT_FORMATS:
        raise InputError(f"export_format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if export_format == "compressed":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError as error:
            raise InputError(f"export_format compressed needs the compressed-tensors package: {INSTALL_HINT}") from error


def _is_24(weight: torch.Tensor) -> bool:
    return weight.shape[-1] % 4 == 0 and int((weight.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2


def _compress(prefix: str, weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.utils import pack_bitmasks

    if fmt == BITMASK_24:  # exactly 2 of every 4 kept (the 2 largest magnitudes: a zero may be kept)
        groups = weight.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True).reshape(weight.shape)
        return {
            f"{prefix}.shape": torch.tensor(list(weight.shape)).reshape(-1, 1),
            f"{prefix}.compressed": weight[keep].reshape(weight.shape[0], weight.shape[1] // 2).contiguous(),
            f"{prefix}.bitmask": pack_bitmasks(keep),
        }
    keep = weight != 0
    counts = keep.sum(dim=-1)
    return {
        f"{prefix}.shape": torch.tensor(list(weight.shape)),
        f"{prefix}.compressed": weight[keep].contiguous(),
        f"{prefix}.bitmask": pack_bitmasks(keep),
        f"{prefix}.row_offsets": torch.cumsum(counts, 0) - counts,
    }


def _decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    from compressed_tensors.utils import unpack_bitmasks

    shape = parts["shape"].flatten().tolist()
    keep = unpack_bitmasks(parts["bitmask"], shape)
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[keep] = parts["compressed"].flatten()
    return dense


def _targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(state-dict prefixes of the decoder projections, names of the other Linear modules)."""
    model = unwrap_model(model)
    names = {id(module): name for name, module in model.named_modules()}
    targets = [names[id(linear)] for _, linear in prunable_linears(model)]
    chosen = set(targets)
    others = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in chosen]
    return targets, others


def save_compressed(model: nn.Module, directory: str | Path, structure: str | None = None) -> dict:
    """Rewrite the ``save_pretrained`` output in ``directory`` in compressed-tensors' sparse format.

    ``structure`` ``"2:4"`` writes ``sparse-24-bitmask`` (checked on the weights), anything else
    ``sparse-bitmask``. Returns the ``sparsity_config`` written into ``config.json``.
    """
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    directory = Path(directory)
    targets, others = _targets(model)
    keys = {f"{prefix}.weight": prefix for prefix in targets}
    fmt = BITMASK_24 if structure == "2:4" else BITMASK
    files = sorted(directory.glob("*.safetensors"))
    found, zeros, total = set(), 0, 0
    renamed = {}
    for path in files:
        tensors, out = load_file(path), {}
        for key, tensor in tensors.items():
            if key not in keys:
                out[key] = tensor
                continue
            if fmt == BITMASK_24 and not _is_24(tensor):
                raise RuntimeError(f"{key} is not 2:4 sparse; cannot write {BITMASK_24}")
            parts = _compress(keys[key], tensor, fmt)
            out.update(parts)
            renamed.update(dict.fromkeys(parts, path.name))
            found.add(key)
            zeros, total = zeros + int((tensor == 0).sum()), total + tensor.numel()
        save_file(out, path, metadata={"format": "pt"})
    if found != set(keys):
        raise RuntimeError(f"saved files lack {sorted(set(keys) - found)[:3]}; cannot write a compressed export")
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in keys} | renamed
        index.write_text(json.dumps(data, indent=2) + "\n")
    schema = Sparse24BitMaskConfig if fmt == BITMASK_24 else BitmaskConfig
    sparsity = schema(targets=["Linear"], ignore=others, global_sparsity=zeros / max(total, 1)).model_dump()
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "sparsity_config": sparsity,
        "transform_config": {},
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sparsity


def load_compressed(directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A dense ``transformers`` model from a directory written by :func:`save_compressed`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    fmt = (getattr(config, "quantization_config", None) or {}).get("sparsity_config", {}).get("format")
    if fmt not in _PARTS:
        raise InputError(f"{directory} holds no {BITMASK} / {BITMASK_24} model (config.json sparsity_config)")
    del config.quantization_config
    state, grouped = {}, {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as stream:
            for key in stream.keys():
                prefix, _, part = key.rpartition(".")
                if part in _PARTS[fmt] and prefix:
                    grouped.setdefault(prefix, {})[part] = stream.get_tensor(key)
                else:
                    state[key] = stream.get_tensor(key)
    for prefix, parts in grouped.items():
        state[f"{prefix}.weight"] = _decompress(parts)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"compressed export does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()
