"""Load a safetensors checkpoint with its decoder layers left on disk (``onload: layer`` + ``offload_dir``).

The model is built without weights (``accelerate.init_empty_weights``; buffers such as the
rotary frequencies are computed as usual), then every tensor is taken from the checkpoint's
safetensors files, which ``safetensors`` opens as memory maps: the embeddings, final norm
and head are read into memory, the decoder layers stay mapped (page cache, read when a layer
is onloaded). Layers stored in another dtype than the one asked for are converted one at a
time and written to the offload directory by :class:`~lightning_prune.onload.LayerOnloader`.
So host memory never holds the decoder, at any depth.

Checkpoint names are the model's state-dict names, optionally without the leading
``model.`` (OPT checkpoints); a tied LM head is the embedding matrix.
"""

import json
from pathlib import Path

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.onload import LayerOnloader, map_tensors

__all__ = ["safetensors_files", "load_streaming"]


def safetensors_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> file of a local checkpoint directory (``model.safetensors`` or a sharded index); empty if none."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), "pt") as handle:
        return {name: single for name in handle.keys()}


def _checkpoint_name(name: str, files: dict[str, Path]) -> str | None:
    for candidate in (name, name.removeprefix("model.")):
        if candidate in files:
            return candidate
    return None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in dict(module.named_parameters(recurse=False)):
        setattr(module, attribute, nn.Parameter(value, requires_grad=True))
    else:
        setattr(module, attribute, value)


def load_streaming(directory: str | Path, config, dtype: torch.dtype, device: torch.device | str, offload_dir: str):
    """The model of ``directory`` with an attached :class:`LayerOnloader` whose layers are the checkpoint's mapped tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    files = safetensors_files(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def source(name: str) -> tuple[str, str]:
        key = _checkpoint_name(name, files)
        if key is None:
            raise InputError(f"checkpoint {str(directory)!r} has no tensor {name!r}; it does not match its config.json")
        return str(files[key]), key

    def read(names: list[str], expected: list[torch.Tensor]) -> list[torch.Tensor]:
        """The named tensors, mapped afresh (one mapping per file per call), shapes checked."""
        values = map_tensors([source(name) for name in names])
        for (_, key), value, tensor in zip(map(source, names), values, expected):
            if tuple(value.shape) != tuple(tensor.shape):
                raise InputError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the config expects {tuple(tensor.shape)}")
        return values

    def empty(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
        named = [*module.named_parameters(prefix=prefix), *module.named_buffers(prefix=prefix)]
        return [(name, tensor) for name, tensor in named if tensor.device.type == "meta"]

    anatomy = Anatomy(model)
    head = anatomy.spec.lm_head + ".weight"
    for name, tensor in empty(model, ""):  # everything but the layers: into memory, in the asked dtype
        if not name.startswith(anatomy.spec.layers + ".") and not (tied and name == head):
            _set_tensor(model, name, read([name], [tensor])[0].to(dtype).clone())
    if tied:
        anatomy.lm_head.weight = anatomy.embed_tokens.weight
    onloader = LayerOnloader(model, device, offload_dir)
    for index, layer in enumerate(anatomy.layers):  # layers: mapped as stored, or converted and written one at a time
        named = empty(layer, "")
        full = [f"{anatomy.spec.layers}.{index}.{name}" for name, _ in named]
        values = read(full, [tensor for _, tensor in named])
        for (name, _), value, checkpoint_name in zip(named, values, full):
            if value.dtype == dtype:
                onloader.mark_mapped([value], [source(checkpoint_name)])
            _set_tensor(layer, name, value.to(dtype))
        onloader.send_home(layer)
    model.eval()
    return model, onloader.attach()
