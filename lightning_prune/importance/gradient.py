"""GradMAP stage 1 (001 §3, Eq. 5-7): mean over samples of Σ_θ ‖∂L_CE/∂θ‖₂ per layer."""

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.importance.base import ScoringOptions, batches_of, check_blocks, evaluating, trainable_layers
from lightning_prune.importance.layerwise import layer_gradients
from lightning_prune.importance.taylor import token_loss_sum
from lightning_prune.onload import active_onloader

__all__ = ["gradient", "block_gradient_norms"]


def block_gradient_norms(model: nn.Module, block: torch.Tensor, flat: list[nn.Parameter], sizes: list[int]) -> torch.Tensor:
    """G_i^(j) (Eq. 6) of one sample: per layer, Σ_θ ‖∂L_CE(block)/∂θ‖₂, shape (num_layers,), on CPU.

    Args:
        model: the model, its layers' parameters requiring grad.
        block: one calibration block, shape (T,).
        flat: every layer's parameters, layer after layer.
        sizes: how many entries of ``flat`` belong to each layer.
    """
    if active_onloader(model) is not None:  # layers go home after their forward: differentiate layer by layer
        per_layer = torch.zeros(len(sizes))
        count = block.numel() - 1

        def receive(position: int, grads: list[torch.Tensor]) -> None:
            per_layer[position] = sum(float(g.float().norm()) for g in grads) / count

        layer_gradients(model, block[None], lambda position, layer: list(layer.parameters()), receive)
        return per_layer
    loss, count = token_loss_sum(model, block[None])
    norms = torch.stack([g.float().norm() for g in torch.autograd.grad(loss / count, flat)])
    return torch.stack([chunk.sum() for chunk in torch.split(norms, sizes)]).cpu()


def gradient(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """s_i = (1/N) Σ_j Σ_{θ ∈ W_i} ‖∂L_CE(x_j)/∂θ‖₂ (Eq. 7); one forward+backward per sample.

    A sample x_j is one calibration block (001 §3: "for each calibration sample" the gradient
    norms are taken, then averaged over the N samples), so the score does not depend on
    ``options.batch_size``: a batch's blocks are differentiated one at a time (the norm of a
    batch's mean gradient would be a different, smaller quantity). L_CE is the mean token
    cross-entropy of the block, Eq. 5 divided by T − 1, a constant for equal-length blocks.
    Per-layer sums and the sample count are reduced over ranks. Only ``torch.autograd.grad``
    is used, so no ``.grad`` is left on the model.

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
        for batch in tqdm(
            batches_of(blocks, options.batch_size), desc=options.bar("gradient scores"), disable=not options.progress, leave=False
        ):
            for block in batch.to(device):
                per_layer = block_gradient_norms(model, block, flat, sizes)
                totals = per_layer if totals is None else totals + per_layer
                samples += 1
    return (options.reduce(totals.double()) / options.reduce(torch.tensor(float(samples), dtype=torch.float64))).float()
