"""Model loading, per-family anatomy and layer surgery."""

from lightning_prune.model.anatomy import FAMILIES, SUPPORTED_FAMILIES, Anatomy, family_spec
from lightning_prune.model.loading import load_config, load_model, load_tokenizer, resolve_model_source
from lightning_prune.model.surgery import remove_layers, replace_layers, untie_embeddings, validate_layer_indices

__all__ = [
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "Anatomy",
    "family_spec",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_model_source",
    "remove_layers",
    "replace_layers",
    "untie_embeddings",
    "validate_layer_indices",
]
