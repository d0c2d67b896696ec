"""Concatenation-based merge of adjacent decoder layers (CoMe, paper 004 Alg. 1 l.34-51, App. C).

Two (or more) layers become one layer of exactly the original widths:

- retention ratios ``r_t`` come from the layers' block influence with skew exponent ``p``
  and minimum retention ``rho`` (:func:`retention_ratios`, Alg. 1 l.34-42);
- each layer contributes ``k_t`` units, ``floor(U * r_t)`` for all but the largest-ratio
  layer, which takes the remainder (:func:`unit_counts`); units are KV groups for attention
  (``U = n_kv``) and intermediate channels for the FFN (``U = I``), chosen as the top-``k_t``
  by channel sensitivity and kept in ascending index, lower layer first;
- attention: rows of q/k/v (and their biases), columns of o_proj; query head ``h`` belongs
  to KV group ``h // g`` (Hugging Face ``repeat_kv``), so group ``k`` owns query rows and
  o_proj columns ``[k*g*d_h, (k+1)*g*d_h)`` (the authors' code tiles the mask instead,
  which is wrong for GQA whenever ``0 < k_t < n_kv``; spec (d));
- FFN: rows of gate/up, columns of down;
- o_proj / down_proj biases and Qwen3 ``q_norm``/``k_norm`` are ratio-weighted sums;
  ``input_layernorm`` and ``post_attention_layernorm`` are plain means (App. C) under the
  default ``norm_rule="mean"``; ``"weighted"`` takes the ratio-weighted sum and ``"dominant"``
  copies the largest-ratio layer's norms (spec (d) "Norm weights", ambiguity 10: with the mean,
  ``r in {0, 1}`` is not layer removal; with ``"dominant"`` it is);
- ``parts`` chooses which sublayers are concatenated; a sublayer not merged is copied whole
  from the largest-ratio layer, with its norm (an ablation, not in the paper).

:func:`sum_merge` is the weight-averaging baseline (LaCo/MKA style) with the same ratios.
"""

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.onload import settle

__all__ = [
    "MERGE_FAMILIES",
    "NORM_RULES",
    "MERGE_PARTS",
    "check_norm_options",
    "check_merge_support",
    "check_merge_options",
    "retention_ratios",
    "unit_counts",
    "top_units",
    "concat_merge",
    "sum_merge",
]

MERGE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
NORM_RULES = ("mean", "weighted", "dominant")
"""How merged ``input_layernorm`` / ``post_attention_layernorm`` weights are formed (see module docstring)."""
MERGE_PARTS = ("both", "attention", "ffn")
"""Which sublayers :func:`concat_merge` concatenates; the others come whole from the dominant layer."""


def check_merge_support(model_or_config) -> None:
    """Refuse a family without merge support (OPT: post-norm variants, LayerNorm biases)."""
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    if family not in MERGE_FAMILIES:
        raise InputError(f"layer merging does not support model type {family!r}; supported: {', '.join(MERGE_FAMILIES)}")


def check_merge_options(target_depth: int, depth: int, p: float, rho: float) -> None:
    """Validate target depth (1..depth-1), skew exponent p > 0 and minimum retention rho in [0, 1)."""
    if not 1 <= target_depth < depth:
        raise InputError(f"target depth {target_depth} is not a smaller depth of this {depth}-layer model; choose 1..{depth - 1}")
    if not p > 0:
        raise InputError(f"p {p} must be > 0 (1 for Llama-like models, 32 for Qwen2.5, inf keeps only the top layer)")
    if not 0 <= rho < 1:
        raise InputError(f"rho {rho} must be in [0, 1) (0 turns the minimum retention off; paper uses 0.85-0.97)")


def check_norm_options(norm_rule: str, parts: str) -> None:
    """Validate the norm rule (one of :data:`NORM_RULES`) and merged parts (one of :data:`MERGE_PARTS`)."""
    if norm_rule not in NORM_RULES:
        raise InputError(f"norm_rule {norm_rule!r} is not known; choose one of {', '.join(NORM_RULES)}")
    if parts not in MERGE_PARTS:
        raise InputError(f"parts {parts!r} is not known; choose one of {', '.join(MERGE_PARTS)}")


def retention_ratios(block_influence: torch.Tensor, p: float = 1.0, rho: float = 0.0) -> torch.Tensor:
    """Retention ratio of each layer of a merge window (Alg. 1 l.34-42).

    ``r_t = BI_t^p / sum BI^p`` (computed as a softmax of ``p * log BI`` so large ``p`` does not
    underflow; ``p = inf`` keeps the largest-BI layer only). If ``max r < rho`` the largest-BI
    layer gets ``rho`` and the others share ``1 - rho`` in proportion (equally when they sum to
    zero). The result sums to 1.

    Args:
        block_influence: BI of the window's layers, shape (m + 1,).
        p: skew exponent, > 0.
        rho: minimum retention of the dominant layer, in [0, 1).

    Returns:
        fp32 ratios, shape (m + 1,).
    """
    influence = block_influence.detach().float().clamp_min(0)
    top = int(influence.argmax())
    if float(influence.sum()) == 0.0:
        ratios = torch.full_like(influence, 1.0 / len(influence))
    elif math.isinf(p):
        ratios = (torch.arange(len(influence)) == top).float()
    else:
        ratios = torch.softmax(p * influence.clamp_min(1e-30).log(), dim=0)
    if float(ratios.max()) < rho:
        others = torch.arange(len(ratios)) != top
        rest = ratios[others].sum()
        ratios[others] = (1 - rho) * (ratios[others] / rest if rest > 0 else torch.full_like(ratios[others], 1 / others.sum()))
        ratios[top] = rho
    return ratios / ratios.sum()


def unit_counts(ratios: torch.Tensor, units: int) -> list[int]:
    """Units per layer: ``floor(units * r_t)`` except the largest-ratio layer, which takes the rest."""
    top = int(ratios.argmax())
    counts = [math.floor(units * float(r)) for r in ratios]
    counts[top] = units - sum(c for i, c in enumerate(counts) if i != top)
    return counts


def top_units(sensitivity: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` most sensitive units, in ascending index order (long, (count,))."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.topk(sensitivity.float(), count, sorted=False).indices.sort().values


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices (k,) -> flat row/column indices (k * width,) of contiguous blocks of ``width``."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _set(parameter: torch.Tensor | None, value: torch.Tensor | None) -> None:
    if parameter is not None and value is not None:
        parameter.copy_(value.to(parameter.dtype))


def _rows(linears: Sequence[nn.Linear], selections: Sequence[torch.Tensor], attribute: str) -> torch.Tensor | None:
    parts = [getattr(lin, attribute) for lin in linears]
    if parts[0] is None:
        return None
    return torch.cat([part.detach()[index.to(part.device)] for part, index in zip(parts, selections)], dim=0)


def _columns(linears: Sequence[nn.Linear], selections: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([lin.weight.detach()[:, index.to(lin.weight.device)] for lin, index in zip(linears, selections)], dim=1)


def _weighted(tensors: Sequence[torch.Tensor | None], weights: Sequence[float]) -> torch.Tensor | None:
    if tensors[0] is None:
        return None
    return sum(w * t.detach().float() for t, w in zip(tensors, weights))


def _concatenate(anatomy: Anatomy, layers, new, ratios, input_parts, output_part) -> None:
    """Write into ``new`` the kept rows of each input projection and the matching columns of
    the output projection (whose bias is the ratio-weighted average).

    Args:
        input_parts: ``[(name, per-layer kept rows)]`` for the projections that read the residual.
        output_part: ``(name, per-layer kept columns)`` for the projection back to the residual.
    """
    for name, rows in input_parts:
        sources = [anatomy.part(layer, name) for layer in layers]
        _set(anatomy.part(new, name).weight, _rows(sources, rows, "weight"))
        _set(anatomy.part(new, name).bias, _rows(sources, rows, "bias"))
    name, columns = output_part
    sources = [anatomy.part(layer, name) for layer in layers]
    _set(anatomy.part(new, name).weight, _columns(sources, columns))
    _set(anatomy.part(new, name).bias, _weighted([source.bias for source in sources], ratios.tolist()))


def _merge_attention(anatomy: Anatomy, layers, new, ratios, sensitivities) -> None:
    g, d_h = anatomy.num_heads // anatomy.num_kv_heads, anatomy.head_dim
    groups = [top_units(s, k) for s, k in zip(sensitivities, unit_counts(ratios, anatomy.num_kv_heads))]
    kv_rows = [_expand(k, d_h) for k in groups]
    q_rows = [_expand(k, g * d_h) for k in groups]
    inputs = [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)]
    _concatenate(anatomy, layers, new, ratios, inputs, ("o_proj", q_rows))


def _merge_ffn(anatomy: Anatomy, layers, new, ratios, sensitivities) -> None:
    channels = [top_units(s, k) for s, k in zip(sensitivities, unit_counts(ratios, anatomy.intermediate_size))]
    inputs = [(name, channels) for name in ("gate_proj", "up_proj") if getattr(anatomy.spec, name) is not None]
    _concatenate(anatomy, layers, new, ratios, inputs, ("down_proj", channels))


def dominant_ratios(ratios: torch.Tensor) -> torch.Tensor:
    """One-hot ratios on the largest-ratio layer (ties: the lower layer), shape like ``ratios``."""
    return (torch.arange(len(ratios)) == int(ratios.argmax())).float()


def norm_weights(ratios: torch.Tensor, norm_rule: str) -> list[float]:
    """Per-layer weights of a merged layer norm under ``norm_rule`` (:data:`NORM_RULES`).

    ``mean``: ``1 / (m + 1)`` each (App. C); ``weighted``: the retention ratios;
    ``dominant``: 1 for the largest-ratio layer, 0 for the others.
    """
    if norm_rule == "mean":
        return [1 / len(ratios)] * len(ratios)
    if norm_rule == "weighted":
        return ratios.tolist()
    return dominant_ratios(ratios).tolist()


def _average_norm(anatomy: Anatomy, layers, new, path: str, weights: Sequence[float]) -> None:
    module = anatomy.norms(new)[path]
    for attribute in ("weight", "bias"):
        if getattr(module, attribute, None) is not None:
            _set(getattr(module, attribute), _weighted([getattr(anatomy.norms(layer)[path], attribute) for layer in layers], weights))


def _merge_norms(anatomy: Anatomy, layers, new, ratios, attention_ratios, norm_rule: str, parts: str) -> None:
    """Layer norms by ``norm_rule`` (mean: App. C); per-head q/k norms: ratio-weighted sum (spec (d)).

    The norm feeding a sublayer copied from the dominant layer (``input_layernorm`` for attention,
    ``post_attention_layernorm`` for the FFN, when ``parts`` leaves it out) is that layer's norm.
    """
    copied = {"attention": (anatomy.spec.post_attention_norm,), "ffn": (anatomy.spec.input_norm,)}.get(parts, ())
    for path in anatomy.norms(new):
        if path in anatomy.spec.attention_norms:
            weights = attention_ratios.tolist()
        else:
            weights = norm_weights(ratios, "dominant" if path in copied else norm_rule)
        _average_norm(anatomy, layers, new, path, weights)


def _part_ratios(ratios: torch.Tensor, parts: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention, FFN) ratios: ``ratios`` for a merged sublayer, one-hot dominant for a copied one."""
    dominant = dominant_ratios(ratios)
    return (ratios if parts in ("both", "attention") else dominant, ratios if parts in ("both", "ffn") else dominant)


@torch.no_grad()
def concat_merge(
    model: nn.Module,
    layers: Sequence[nn.Module],
    ratios: torch.Tensor,
    attention_sensitivity: Sequence[torch.Tensor],
    ffn_sensitivity: Sequence[torch.Tensor],
    *,
    norm_rule: str = "mean",
    parts: str = "both",
) -> nn.Module:
    """One new decoder layer concatenating the most sensitive units of ``layers`` (Alg. 1 l.44-51).

    Args:
        model: the model the layers belong to (for family and head counts).
        layers: the window's layers, shallow to deep.
        ratios: retention ratios, shape (len(layers),), summing to 1.
        attention_sensitivity: per layer, KV-group sensitivity, shape (n_kv,).
        ffn_sensitivity: per layer, intermediate-channel sensitivity, shape (I,).
        norm_rule: merged layer norms: ``mean`` (App. C), ``weighted`` (by ratio) or
            ``dominant`` (the largest-ratio layer's).
        parts: ``both`` (paper), ``attention`` or ``ffn``: the sublayer concatenated; the other
            is copied from the largest-ratio layer together with its norm.

    Returns:
        A new layer (a copy of ``layers[0]`` with replaced tensors) of the original shapes.
    """
    check_merge_support(model)
    check_norm_options(norm_rule, parts)
    settle(model)  # onloaded: every layer of the window in host memory before their weights mix
    anatomy = Anatomy(model)
    attention_ratios, ffn_ratios = _part_ratios(ratios, parts)
    new = copy.deepcopy(layers[0])
    _merge_attention(anatomy, layers, new, attention_ratios, attention_sensitivity)
    _merge_ffn(anatomy, layers, new, ffn_ratios, ffn_sensitivity)
    _merge_norms(anatomy, layers, new, ratios, attention_ratios, norm_rule, parts)
    return new


@torch.no_grad()
def sum_merge(
    model: nn.Module, layers: Sequence[nn.Module], ratios: torch.Tensor, *_unused, norm_rule: str = "mean", parts: str = "both"
) -> nn.Module:
    """Baseline: every parameter (norms included) is the ratio-weighted average of the layers' parameters.

    ``norm_rule`` and ``parts`` belong to :func:`concat_merge`; anything but the defaults is refused.
    """
    check_merge_support(model)
    if (norm_rule, parts) != ("mean", "both"):
        raise InputError("sum-merge averages every parameter by ratio; norm_rule and parts apply to come and come_p only")
    settle(model)
    new = copy.deepcopy(layers[0])
    sources = [dict(layer.named_parameters()) for layer in layers]
    for name, parameter in new.named_parameters():
        _set(parameter, _weighted([source[name] for source in sources], ratios.tolist()))
    return new
