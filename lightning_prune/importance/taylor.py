"""Taylor+ (004 App. A after Kim et al. 2024 / Ma et al. 2023): Σ|w · ∂L/∂w| per layer."""

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.importance.base import ScoringOptions, batches_of, check_blocks, evaluating
from lightning_prune.model.anatomy import Anatomy

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
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in flat]
    tokens = 0
    device = next(model.parameters()).device
    try:
        for w in flat:
            w.requires_grad_(True)
        with evaluating(model):
            for batch in tqdm(
                batches_of(blocks, options.batch_size), desc=options.bar("taylor scores"), disable=not options.progress, leave=False
            ):
                loss, count = token_loss_sum(model, batch.to(device))
                for total, grad in zip(sums, torch.autograd.grad(loss, flat)):
                    total += grad.float()
                tokens += count
    finally:
        for w, flag in zip(flat, flags):
            w.requires_grad_(flag)
    total_tokens = float(options.reduce(torch.tensor(float(tokens))))
    grads = iter([options.reduce(s) / total_tokens for s in sums])
    return torch.tensor(
        [sum(float((w.detach().float() * next(grads)).abs().sum()) for w in group) for group in weights], dtype=torch.float32
    )
