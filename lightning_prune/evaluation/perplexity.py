"""Perplexity over token blocks: exp(mean next-token NLL over all predicted positions).

Plain PyTorch on purpose: no collective runs inside, so one rank can evaluate while the
others wait at a barrier (a syncing metric would deadlock there).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of ``model`` on ``blocks`` (N, T): every block predicts its tokens 1..T-1.

    Logits are taken in fp32, so the value equals ``exp`` of the mean Hugging Face
    causal-LM loss over the same blocks whatever the model's dtype.
    """
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").double()
        count += targets.numel()
    model.train(was_training)
    return math.exp(float(total) / count) if count else float("nan")
