"""Taylor+ (004 App. A after Kim et al. 2024 / Ma et al. 2023): Σ|w · ∂L/∂w| per layer."""

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.importance.base import ScoringOptions, batches_of, check_blocks, evaluating
from lightning_prune.importance.layerwise import layer_gradients
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.onload import active_onloader

__all__ = ["taylor", "token_loss_sum"]


def token_loss_sum(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over a batch (B, T) in fp32, and the number of tokens."""
    logits = model(input_ids=batch, use_cache=False).logits.float()
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return loss, batch[:, 1:].numel()


def taylor(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """I_l = Σ_{W ∈ layer l} Σ_ij |W_ij · ∂L/∂W_ij| with L the mean calibration cross-entropy.

    Gradients are summed over batches (and ranks, via ``options.reduce``) before the product,
    so the score is that of the loss over the whole calibration set.

    Returns:
        fp32 scores, shape (num_layers,).
    """
    blocks = check_blocks(data, "taylor")
    anatomy = Anatomy(model)
    weights = [[linear.weight for linear in anatomy.linears(layer).values()] for layer in anatomy.layers]
    flat = [w for group in weights for w in group]
    flags = [w.requires_grad for w in flat]
    onloaded = active_onloader(model) is not None  # then the sums stay in host memory, like the layers
    sums = [torch.zeros_like(w, dtype=torch.float32, device="cpu" if onloaded else w.device) for w in flat]
    tokens = 0
    device = next(model.parameters()).device
    try:
        for w in flat:
            w.requires_grad_(True)
        with evaluating(model):
            for batch in tqdm(
                batches_of(blocks, options.batch_size), desc=options.bar("taylor scores"), disable=not options.progress, leave=False
            ):
                tokens += _accumulate(model, batch.to(device), weights, sums, onloaded)
    finally:
        for w, flag in zip(flat, flags):
            w.requires_grad_(flag)
    total_tokens = float(options.reduce(torch.tensor(float(tokens))))
    grads = iter([options.reduce(s) / total_tokens for s in sums])
    return torch.tensor(
        [sum(float((w.detach().float() * next(grads).to(w.device)).abs().sum()) for w in group) for group in weights],
        dtype=torch.float32,
    )


def _accumulate(model: nn.Module, batch: torch.Tensor, weights: list[list[torch.Tensor]], sums: list[torch.Tensor], onloaded: bool) -> int:
    """Add ∂(summed loss of ``batch``)/∂W to ``sums`` (flat, layer after layer); return the batch's token count."""
    if not onloaded:
        flat = [w for group in weights for w in group]
        loss, count = token_loss_sum(model, batch)
        for total, grad in zip(sums, torch.autograd.grad(loss, flat)):
            total += grad.float()
        return count
    offsets = [sum(len(group) for group in weights[:position]) for position in range(len(weights))]

    def receive(position: int, grads: list[torch.Tensor]) -> None:
        for index, grad in enumerate(grads):
            sums[offsets[position] + index] += grad.float().cpu()

    _, count = layer_gradients(model, batch, lambda position, layer: weights[position], receive)
    return count
