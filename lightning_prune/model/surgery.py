"""Structural edits of decoder stacks: remove layers, replace a span by one layer, untie embeddings.

Every edit keeps the model a valid Hugging Face model: attention ``layer_idx`` values are
renumbered (the KV cache is indexed by them), ``num_hidden_layers`` and per-layer config
lists (``layer_types``) follow the new stack, so ``save_pretrained`` →
``from_pretrained`` rebuilds exactly the same architecture.
"""

from collections.abc import Iterable, Sequence

from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy

__all__ = ["validate_layer_indices", "remove_layers", "replace_layers", "untie_embeddings", "renumber_layers"]

PER_LAYER_CONFIG_KEYS = ("layer_types",)


def validate_layer_indices(indices: Iterable[int], num_layers: int, *, allow_all: bool = False) -> list[int]:
    """Check indices are in range, distinct and (unless ``allow_all``) leave at least one layer."""
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise InputError(f"layer index {bad[0]} out of range; the model has layers 0..{num_layers - 1}")
    duplicated = sorted({i for i in indices if indices.count(i) > 1})
    if duplicated:
        raise InputError(f"layer index {duplicated[0]} given more than once; list each layer once")
    if not indices:
        raise InputError("no layers given; name at least one layer index")
    if not allow_all and len(indices) >= num_layers:
        raise InputError(f"cannot remove all {num_layers} layers; keep at least one")
    return sorted(indices)


def renumber_layers(model: nn.Module) -> None:
    """Set every ``layer_idx`` attribute inside decoder layer i to i (KV-cache slots)."""
    for index, layer in enumerate(Anatomy(model).layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


def _rebuild_stack(model: nn.Module, new_layers: Sequence[nn.Module], source_positions: Sequence[int]) -> None:
    Anatomy(model).set_layers(new_layers)
    config = model.config
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(config, key, [values[i] for i in source_positions])
    config.num_hidden_layers = len(new_layers)
    renumber_layers(model)


def remove_layers(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Delete decoder layers in place (indices of the current stack); return the kept indices."""
    layers = Anatomy(model).layers
    removed = set(validate_layer_indices(indices, len(layers)))
    kept = [i for i in range(len(layers)) if i not in removed]
    _rebuild_stack(model, [layers[i] for i in kept], kept)
    return kept


def replace_layers(model: nn.Module, start: int, end: int, layer: nn.Module) -> None:
    """Replace the span ``layers[start:end]`` by the single ``layer``, keeping order.

    The new layer takes the per-layer config entries (e.g. attention type) of ``start``;
    a span that mixes attention types is refused since one layer cannot honour both.
    """
    layers = Anatomy(model).layers
    if not 0 <= start < end <= len(layers):
        raise InputError(f"layer span [{start}, {end}) is not inside 0..{len(layers)}; need 0 <= start < end <= depth")
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(set(types[start:end])) > 1:
        raise InputError(f"layers {start}..{end - 1} mix attention types {sorted(set(types[start:end]))}; merge within one type")
    positions = [*range(start), start, *range(end, len(layers))]
    new_layers = [*layers[:start], layer, *layers[end:]]
    _rebuild_stack(model, new_layers, positions)


def untie_embeddings(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of the embedding matrix; return whether they were tied."""
    anatomy = Anatomy(model)
    if anatomy.lm_head.weight is not anatomy.embed_tokens.weight:
        model.config.tie_word_embeddings = False
        return False
    anatomy.lm_head.weight = nn.Parameter(anatomy.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True
