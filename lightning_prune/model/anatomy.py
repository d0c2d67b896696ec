"""Where things live inside each supported decoder-only family.

One table of data (``FAMILIES``) describes every family; :class:`Anatomy` resolves it on a
live model so that algorithms never spell out attribute paths themselves.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.errors import InputError

__all__ = ["FamilySpec", "FAMILIES", "SUPPORTED_FAMILIES", "Anatomy", "family_spec"]


@dataclass(frozen=True)
class FamilySpec:
    """Dotted attribute paths of one family.

    ``layers``, ``embed_tokens``, ``final_norm`` and ``lm_head`` are relative to the causal-LM
    model; the rest are relative to one decoder layer. ``gate`` is ``None`` for a plain
    two-matrix MLP (OPT). ``pre_norm`` says whether the residual branches see normalised
    inputs (Llama-style); ``None`` means "read ``do_layer_norm_before`` from the config".
    """

    layers: str
    embed_tokens: str
    final_norm: str
    lm_head: str
    attention: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    up_proj: str
    down_proj: str
    gate_proj: str | None
    input_norm: str
    post_attention_norm: str
    attention_norms: tuple[str, ...] = ()
    intermediate_size_key: str = "intermediate_size"
    pre_norm: bool | None = True


_LLAMA_LIKE = FamilySpec(
    layers="model.layers",
    embed_tokens="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attention="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    gate_proj="mlp.gate_proj",
    up_proj="mlp.up_proj",
    down_proj="mlp.down_proj",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": FamilySpec(**{**_LLAMA_LIKE.__dict__, "attention_norms": ("self_attn.q_norm", "self_attn.k_norm")}),
    "opt": FamilySpec(
        layers="model.decoder.layers",
        embed_tokens="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        attention="self_attn",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        o_proj="self_attn.out_proj",
        gate_proj=None,
        up_proj="fc1",
        down_proj="fc2",
        input_norm="self_attn_layer_norm",
        post_attention_norm="final_layer_norm",
        intermediate_size_key="ffn_dim",
        pre_norm=None,
    ),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def family_spec(config) -> FamilySpec:
    """Return the :class:`FamilySpec` for a config, or raise naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise InputError(f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED_FAMILIES)}")
    return FAMILIES[model_type]


def _get(root: nn.Module, path: str | None):
    if path is None:
        return None
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


class Anatomy:
    """A live view of one model's structure (layers, embeddings, head, projections, head counts)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.spec = family_spec(self.config)

    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.spec.layers)

    def set_layers(self, layers) -> None:
        """Install a new decoder stack (a list of layers) in place of the current one."""
        parent_path, name = self.spec.layers.rsplit(".", 1)
        setattr(_get(self.model, parent_path), name, nn.ModuleList(layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return _get(self.model, self.spec.embed_tokens)

    @property
    def final_norm(self) -> nn.Module | None:
        return _get(self.model, self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return _get(self.model, self.spec.lm_head)

    @property
    def is_pre_norm(self) -> bool:
        if self.spec.pre_norm is None:
            return bool(getattr(self.config, "do_layer_norm_before", True))
        return self.spec.pre_norm

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return getattr(self.config, self.spec.intermediate_size_key)

    def part(self, layer: nn.Module, name: str) -> nn.Module | None:
        """Return a named part of a decoder layer, e.g. ``part(layer, "down_proj")``."""
        return _get(layer, getattr(self.spec, name))

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The layer's projection matrices by role (q/k/v/o, gate/up/down), in forward order."""
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return {name: self.part(layer, name) for name in names if getattr(self.spec, name) is not None}

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The layer's normalisation modules by dotted path."""
        paths = (self.spec.input_norm, self.spec.post_attention_norm, *self.spec.attention_norms)
        return {path: _get(layer, path) for path in paths}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map the last decoder layer's output to logits (final norm, projection, lm_head)."""
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        project_out = getattr(_get(self.model, self.spec.layers.rsplit(".", 1)[0]), "project_out", None)
        if project_out is not None:
            hidden = project_out(hidden)
        return self.lm_head(hidden)
