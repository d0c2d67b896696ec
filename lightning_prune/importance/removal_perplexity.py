"""PPL metric (SLEB; 004 App. A): calibration perplexity of the current model without layer l."""

import torch
from torch import nn

from lightning_prune.importance.base import ScoringOptions, batches_of, check_blocks, evaluating, removal_outputs
from lightning_prune.model.anatomy import Anatomy

__all__ = ["removal_perplexity"]


def removal_perplexity(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """I_l = exp(−(1/n) Σ_i log p_{M−l}(x_i | x_<i)) over all calibration tokens.

    A high perplexity after removal means the layer matters. Only ``options.candidates`` are
    evaluated; the prefix before the first candidate runs once (see :func:`removal_outputs`).
    NLL sums and token counts are reduced over ranks before the exponential.

    Returns:
        fp32 scores, shape (num_layers,); ``nan`` for layers that are not candidates.
    """
    blocks = check_blocks(data, "removal_perplexity")
    num_layers = Anatomy(model).num_layers
    batches = batches_of(blocks, options.batch_size)
    nll = torch.zeros(num_layers, dtype=torch.float64)
    with evaluating(model):
        for j, b, logits in removal_outputs(model, batches, options, desc="removal perplexity"):
            targets = batches[b][:, 1:].to(logits.device)
            nll[j] += float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"))
    tokens = float(options.reduce(torch.tensor(float(blocks[:, 1:].numel()))))
    scores = torch.exp(options.reduce(nll) / tokens).float()
    mask = torch.ones(num_layers, dtype=torch.bool)
    mask[options.positions(num_layers)] = False
    scores[mask] = float("nan")
    return scores
