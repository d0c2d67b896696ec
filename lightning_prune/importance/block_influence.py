"""CosSim(BI) (ShortGPT; 000, 004 App. A): 1 − mean token cosine between a layer's input and output."""

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import capture
from lightning_prune.importance.base import ScoringOptions, batches_of, check_blocks, evaluating
from lightning_prune.model.anatomy import Anatomy

__all__ = ["block_influence", "span_influence", "batches_influence", "span_cosine_sums"]


def _cosine_sum(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of cos(first_t, second_t) for (B, T, D) tensors, in fp32 (row-wise)."""
    return nn.functional.cosine_similarity(first.float(), second.float(), dim=-1).sum()


@torch.no_grad()
def span_cosine_sums(model: nn.Module, batches, span: int, options: ScoringOptions) -> tuple[torch.Tensor, int]:
    """Per start s, Σ over this rank's tokens of cos(input of layer s, output of layer s + span − 1).

    Args:
        batches: token batches (B, T); lengths may differ between batches.

    Returns:
        (sums, tokens): fp32 (num_layers,) with zeros where the span runs past the last layer,
        and the number of tokens; neither is reduced over ranks.
    """
    num_layers = Anatomy(model).num_layers
    sums = torch.zeros(num_layers, dtype=torch.float32)
    tokens = 0
    device = next(model.parameters()).device
    with evaluating(model):
        for batch in tqdm(batches, desc=options.bar("block influence: cosine per layer"), disable=not options.progress, leave=False):
            with capture(model, outputs=True) as record:
                model(input_ids=batch.to(device), use_cache=False)
            for s in range(num_layers - span + 1):
                sums[s] += float(_cosine_sum(record.inputs[s][0], record.outputs[s + span - 1][0]))
            tokens += batch.numel()
    return sums, tokens


def batches_influence(model: nn.Module, batches, span: int, options: ScoringOptions) -> torch.Tensor:
    """1 − mean token cosine over ``batches`` (reduced over ranks), as :func:`span_influence`."""
    num_layers = Anatomy(model).num_layers
    sums, tokens = span_cosine_sums(model, batches, span, options)
    scores = 1 - options.reduce(sums) / float(options.reduce(torch.tensor(float(tokens))))
    scores[num_layers - span + 1 :] = float("nan")
    return scores


def span_influence(model: nn.Module, blocks: torch.Tensor, span: int, options: ScoringOptions) -> torch.Tensor:
    """For each start s: 1 − mean_t cos(input of layer s, output of layer s + span − 1).

    Returns:
        fp32 tensor (num_layers,); entries where the span runs past the last layer are ``nan``.
    """
    return batches_influence(model, batches_of(blocks, options.batch_size), span, options)


def block_influence(model: nn.Module, data, options: ScoringOptions) -> torch.Tensor:
    """BI_l = 1 − E_t cos(x_l,t, x_{l+1},t): a layer that leaves its input unchanged scores 0.

    Returns:
        fp32 scores, shape (num_layers,).
    """
    return span_influence(model, check_blocks(data, "block_influence"), 1, options)
