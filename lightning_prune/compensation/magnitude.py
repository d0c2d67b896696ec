"""MagComp (Prune&Comp, 000): fold the magnitude gain of a removed layer into the layers before it.

Removing layer i takes away its magnitude gain: layer i+1 now sees h_i instead of the larger
h_{i+1}. MagComp estimates the gain α = E_t[‖h_{i+1,t}‖ / ‖h_{i,t}‖] on calibration data and
rescales the residual stream entering position i by α. In a pre-norm block the branches see
only norm(h), and RMSNorm/LayerNorm(αh) = norm(h) (up to eps), so scaling the embeddings and
the residual-writing projections (o_proj, down_proj, with biases) of every layer before i by α
scales h_i by α exactly — the folded model equals the runtime-scaled one.

Tied embeddings (``lm_head.weight is embed_tokens.weight``) stay tied: scaling the shared
matrix by α also scales what the LM head reads, so the final norm's weight (and bias, for a
LayerNorm) is divided by α. With ``norm(x) = w ⊙ n(x) + b``, the logits become
``αE · (w ⊙ n(x) + b)/α = E · norm(x)``: unchanged, and exact (no eps involved). Only a model
whose final norm has no learned weight to absorb 1/α is untied (and then has one more
vocabulary matrix than the dense model).
"""

from operator import attrgetter

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import capture
from lightning_prune.errors import InputError
from lightning_prune.importance.base import ScoringOptions, batches_of, evaluating
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import remove_layers, untie_embeddings
from lightning_prune.onload import edited

__all__ = [
    "EXTRA_EMBEDDINGS",
    "check_foldable",
    "magnitude_gain",
    "final_norm_absorbs_scale",
    "fold_residual_scale",
    "MagnitudeCompensation",
]

EXTRA_EMBEDDINGS = {"opt": ("model.decoder.embed_positions",)}


def check_foldable(model: nn.Module, what: str = "magnitude compensation") -> None:
    """Refuse models where scaling the residual stream cannot be folded exactly (post-norm, OPT project_in)."""
    anatomy = Anatomy(model)
    if not anatomy.is_pre_norm:
        raise InputError(
            f"{what} is not exact for post-norm blocks ({anatomy.family} with do_layer_norm_before=False); use --compensation none"
        )
    if getattr(attrgetter(anatomy.spec.layers.rsplit(".", 1)[0])(model), "project_in", None) is not None:
        raise InputError(f"{what} is not exact for {anatomy.family} with project_in (word_embed_proj_dim != hidden_size)")


@torch.no_grad()
def magnitude_gain(model: nn.Module, blocks: torch.Tensor, position: int, options: ScoringOptions) -> float:
    """α = mean over calibration tokens of ‖output_t‖ / ‖input_t‖ of the layer at ``position``."""
    device = next(model.parameters()).device
    ratio_sum, tokens = torch.zeros((), dtype=torch.float64), 0
    with evaluating(model):
        for batch in tqdm(
            batches_of(blocks, options.batch_size), desc=options.bar("MagComp: magnitude gain"), disable=not options.progress, leave=False
        ):
            with capture(model, [position]) as record:
                model(input_ids=batch.to(device), use_cache=False)
            hidden_in, hidden_out = record.inputs[position][0].float(), record.outputs[position][0].float()
            ratio_sum += (hidden_out.norm(dim=-1) / hidden_in.norm(dim=-1).clamp_min(1e-12)).double().sum().cpu()
            tokens += batch.numel()
    total = options.reduce(torch.stack([ratio_sum, torch.tensor(float(tokens), dtype=torch.float64)]))
    return float(total[0] / total[1])


def final_norm_absorbs_scale(model: nn.Module) -> bool:
    """Whether the final norm has a learned weight that can take 1/α for a tied LM head."""
    norm = Anatomy(model).final_norm
    return isinstance(getattr(norm, "weight", None), torch.Tensor)


def _scale(modules, factor: float) -> None:
    """Multiply the weight and bias (where present) of each module by ``factor`` in place."""
    for module in modules:
        for parameter in (module.weight, getattr(module, "bias", None)):
            if parameter is not None:
                parameter.mul_(factor)


@torch.no_grad()
def fold_residual_scale(model: nn.Module, position: int, alpha: float) -> None:
    """Scale the residual stream entering layer ``position`` by ``alpha``, in the weights.

    Embeddings and the residual-writing projections of layers ``< position`` are scaled by
    ``alpha``. Tied embeddings stay tied: the final norm's weight and bias are divided by
    ``alpha`` so the LM head, which reads the scaled shared matrix, gives the same logits.
    Embeddings are untied only when the final norm has no weight to absorb the scale.

    Args:
        model: a pre-norm model (see :func:`check_foldable`).
        position: current index of the layer whose input is scaled.
        alpha: the scale, > 0.
    """
    check_foldable(model)
    anatomy = Anatomy(model)
    tied = anatomy.lm_head.weight is anatomy.embed_tokens.weight and final_norm_absorbs_scale(model)
    if not tied:
        untie_embeddings(model)
    modules = [anatomy.embed_tokens, *(attrgetter(path)(model) for path in EXTRA_EMBEDDINGS.get(anatomy.family, ()))]
    for layer in list(anatomy.layers)[:position]:
        modules += [anatomy.part(layer, "o_proj"), anatomy.part(layer, "down_proj")]
    _scale(modules, alpha)
    edited(model, list(anatomy.layers)[:position])  # onloaded to disk: the scaled layers are written back
    if tied:
        _scale([anatomy.final_norm], 1.0 / alpha)


class MagnitudeCompensation:
    """Prune&Comp MagComp: measure α of each layer just before removing it, then fold it."""

    name = "magnitude"

    def check(self, model: nn.Module) -> None:
        check_foldable(model)

    def start(self, model: nn.Module, blocks: torch.Tensor, options: ScoringOptions) -> None:
        return None

    def remove(self, model: nn.Module, position: int, blocks: torch.Tensor, options: ScoringOptions) -> dict:
        """Measure α at ``position``, remove that layer, fold α into everything before it."""
        alpha = magnitude_gain(model, blocks, position, options)
        remove_layers(model, [position])
        fold_residual_scale(model, position, alpha)
        return {"position": position, "alpha": alpha}

    def finish(self, model: nn.Module, blocks: torch.Tensor, kept: list[int], options: ScoringOptions) -> dict:
        return {}
