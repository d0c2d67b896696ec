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
  ``input_layernorm`` and ``post_attention_layernorm`` are plain means (App. C).

:func:`sum_merge` is the weight-averaging baseline (LaCo/MKA style) with the same ratios.
"""

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "MERGE_FAMILIES",
    "check_merge_support",
    "check_merge_options",
    "retention_ratios",
    "unit_counts",
    "top_units",
    "concat_merge",
    "sum_merge",
]

MERGE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


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


def _merge_norms(anatomy: Anatomy, layers, new, ratios) -> None:
    """Layer norms: unweighted mean (App. C); per-head q/k norms: ratio-weighted sum (spec (d))."""
    new_norms = anatomy.norms(new)
    for path, module in new_norms.items():
        weights = ratios.tolist() if path in anatomy.spec.attention_norms else [1 / len(layers)] * len(layers)
        for attribute in ("weight", "bias"):
            if getattr(module, attribute, None) is not None:
                _set(getattr(module, attribute), _weighted([getattr(anatomy.norms(layer)[path], attribute) for layer in layers], weights))


@torch.no_grad()
def concat_merge(
    model: nn.Module,
    layers: Sequence[nn.Module],
    ratios: torch.Tensor,
    attention_sensitivity: Sequence[torch.Tensor],
    ffn_sensitivity: Sequence[torch.Tensor],
) -> nn.Module:
    """One new decoder layer concatenating the most sensitive units of ``layers`` (Alg. 1 l.44-51).

    Args:
        model: the model the layers belong to (for family and head counts).
        layers: the window's layers, shallow to deep.
        ratios: retention ratios, shape (len(layers),), summing to 1.
        attention_sensitivity: per layer, KV-group sensitivity, shape (n_kv,).
        ffn_sensitivity: per layer, intermediate-channel sensitivity, shape (I,).

    Returns:
        A new layer (a copy of ``layers[0]`` with replaced tensors) of the original shapes.
    """
    check_merge_support(model)
    anatomy = Anatomy(model)
    new = copy.deepcopy(layers[0])
    _merge_attention(anatomy, layers, new, ratios, attention_sensitivity)
    _merge_ffn(anatomy, layers, new, ratios, ffn_sensitivity)
    _merge_norms(anatomy, layers, new, ratios)
    return new


@torch.no_grad()
def sum_merge(model: nn.Module, layers: Sequence[nn.Module], ratios: torch.Tensor, *_unused) -> nn.Module:
    """Baseline: every parameter is the ratio-weighted average of the layers' parameters."""
    check_merge_support(model)
    new = copy.deepcopy(layers[0])
    sources = [dict(layer.named_parameters()) for layer in layers]
    for name, parameter in new.named_parameters():
        _set(parameter, _weighted([source[name] for source in sources], ratios.tolist()))
    return new
