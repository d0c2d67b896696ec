"""Perplexity over token blocks: exp(mean next-token NLL over all predicted positions)."""

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True, desc: str = "perplexity"
) -> float:
    """Perplexity of ``model`` on ``blocks`` (N, T): every block predicts its tokens 1..T-1.

    Logits are taken in fp32, so the value equals ``exp`` of the mean Hugging Face
    causal-LM loss over the same blocks whatever the model's dtype.
    """
    device = next(model.parameters()).device
    metric = Perplexity().to(device)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        metric.update(logits[:, :-1], batch[:, 1:])
    model.train(was_training)
    return float(metric.compute())
