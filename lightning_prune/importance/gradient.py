"""GradMAP stage 1 (001 §3, Eq. 5-7): mean over samples of Σ_θ ‖∂L_CE/∂θ‖₂ per layer."""

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.importance.base import ScoringOptions, batches_of, check_blocks, evaluating, trainable_layers
from lightning_prune.importance.taylor import token_loss_sum

__all__ = ["gradient"]


def gradient(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """s_i = (1/N) Σ_j Σ_{θ ∈ W_i} ‖∂L_CE(x_j)/∂θ‖₂ (Eq. 7); one forward+backward per sample.

    A "sample" is one batch of ``options.batch_size`` blocks (``batch_size=1`` is Eq. 6 with
    one block per sample); L_CE is the mean token cross-entropy of the sample. Only
    ``torch.autograd.grad`` is used, so no ``.grad`` is left on the model.

    Returns:
        fp32 scores, shape (num_layers,).
    """
    blocks = check_blocks(data, "gradient")
    device = next(model.parameters()).device
    totals = None
    samples = 0
    with evaluating(model), trainable_layers(model) as groups:
        flat = [p for group in groups for p in group]
        sizes = [len(group) for group in groups]
        for batch in tqdm(batches_of(blocks, options.batch_size), desc="gradient", disable=not options.progress, leave=False):
            loss, count = token_loss_sum(model, batch.to(device))
            norms = torch.stack([g.float().norm() for g in torch.autograd.grad(loss / count, flat)])
            per_layer = torch.stack([chunk.sum() for chunk in torch.split(norms, sizes)]).cpu()
            totals = per_layer if totals is None else totals + per_layer
            samples += 1
    return (options.reduce(totals) / options.reduce(torch.tensor(float(samples)))).float()
