"""Calibration statistics CoMe needs: channel sensitivity, BI and SBI (paper 004, Alg. 1 l.4-6).

One calibration pass over the *current* model records, per decoder layer,

- the mean absolute input of the output projections (``o_proj`` input ``a``, shape
  (B, T, n_h*d_h), and ``down_proj`` input ``u``, shape (B, T, I)), from which the channel
  sensitivity ``S`` is formed with the L1 column norms of those projections (spec (a));
- the per-token cosine between what enters layer ``l`` and what leaves layer ``l`` (BI,
  Eq. 1) and layer ``l + 1`` (SBI of the two-layer window, Eq. 1'), on raw layer outputs
  taken with :func:`lightning_prune.capture.capture` hooks (never ``output_hidden_states``,
  whose last entry is post-norm).

Everything is accumulated in fp32 and averaged over all calibration tokens.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.capture import capture
from lightning_prune.merging.distill import layer_outputs
from lightning_prune.model.anatomy import Anatomy

__all__ = ["LayerStatistics", "calibration_statistics", "attention_sensitivity", "ffn_sensitivity", "column_l1", "token_cosine"]


@dataclass
class LayerStatistics:
    """Calibration statistics of every current layer.

    Attributes:
        attention: per layer, sensitivity of each KV group, shape (n_kv,).
        ffn: per layer, sensitivity of each intermediate channel, shape (I,).
        block_influence: BI_l = 1 - E cos(H^(l-1), H^(l)), shape (L,).
        window_influence: SBI_{l;l+1} = 1 - E cos(H^(l-1), H^(l+1)), shape (L - 1,).
    """

    attention: list[torch.Tensor]
    ffn: list[torch.Tensor]
    block_influence: torch.Tensor
    window_influence: torch.Tensor


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the cosine between rows of ``a`` and ``b`` (B, T, D), in fp32."""
    return F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1, eps=1e-8).sum()


def column_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each input column of a linear weight (D_out, D_in), fp32, shape (D_in,)."""
    return weight.detach().float().abs().sum(dim=0)


def attention_sensitivity(mean_abs_input: torch.Tensor, o_column_norms: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """KV-group sensitivity S_attn (spec (a)): mean over the group's channels of |a_c| * ||W_o[:, c]||_1.

    Query head ``h`` reads KV head ``h // g`` (Hugging Face ``repeat_kv``), so the ``g * d_h``
    channels of group ``k`` are the contiguous range ``[k*g*d_h, (k+1)*g*d_h)`` of o_proj's input.

    Args:
        mean_abs_input: mean over tokens of |a|, shape (n_h * d_h,).
        o_column_norms: :func:`column_l1` of the output projection's weight (D, n_h * d_h).
        num_kv_heads: n_kv.

    Returns:
        Shape (n_kv,).
    """
    return (mean_abs_input * o_column_norms.to(mean_abs_input.device)).view(num_kv_heads, -1).mean(dim=1)


def ffn_sensitivity(mean_abs_input: torch.Tensor, down_column_norms: torch.Tensor) -> torch.Tensor:
    """Intermediate-channel sensitivity S_ffn[j] = mean |u_j| * ||W_down[:, j]||_1, shape (I,).

    Args:
        mean_abs_input: mean over tokens of |u|, shape (I,).
        down_column_norms: :func:`column_l1` of the down_proj weight (D, I).
    """
    return mean_abs_input * down_column_norms.to(mean_abs_input.device)


class _InputMeans:
    """Forward pre-hooks summing |input| per channel of chosen linear layers (fp32), and taking
    the layers' :func:`column_l1` norms on their first call (while an onloaded layer is on the device)."""

    def __init__(self, modules: dict[tuple[int, str], nn.Linear]):
        self.sums = {key: torch.zeros(module.in_features) for key, module in modules.items()}
        self.norms: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = [module.register_forward_pre_hook(self._hook(key)) for key, module in modules.items()]

    def _hook(self, key):
        def hook(module, args):
            flat = args[0].detach().float().flatten(0, -2)
            self.sums[key] = self.sums[key].to(flat.device) + flat.abs().sum(dim=0)
            if key not in self.norms:
                self.norms[key] = column_l1(module.weight).cpu()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def calibration_statistics(model: nn.Module, batches: Iterable[torch.Tensor], *, progress: bool = True) -> LayerStatistics:
    """Run the calibration batches (B, T) once and return :class:`LayerStatistics` of every layer."""
    anatomy = Anatomy(model)
    depth = anatomy.num_layers
    device = next(model.parameters()).device
    watched = {}
    for index, layer in enumerate(anatomy.layers):
        watched[(index, "o_proj")] = anatomy.part(layer, "o_proj")
        watched[(index, "down_proj")] = anatomy.part(layer, "down_proj")
    means = _InputMeans(watched)
    same_layer = torch.zeros(depth)
    two_layers = torch.zeros(max(depth - 1, 0))
    tokens = 0
    try:
        for batch in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            with capture(model) as record:
                layer_outputs(model, batch.to(device), [depth - 1])  # stops before the final norm and LM head
            tokens += batch.numel()
            for index in range(depth):
                same_layer[index] += token_cosine(record.inputs[index][0], record.outputs[index][0]).cpu()
                if index + 1 < depth:
                    two_layers[index] += token_cosine(record.inputs[index][0], record.outputs[index + 1][0]).cpu()
    finally:
        means.remove()
    attention = [
        attention_sensitivity(means.sums[(i, "o_proj")].cpu() / tokens, means.norms[(i, "o_proj")], anatomy.num_kv_heads)
        for i in range(depth)
    ]
    ffn = [ffn_sensitivity(means.sums[(i, "down_proj")].cpu() / tokens, means.norms[(i, "down_proj")]) for i in range(depth)]
    return LayerStatistics(attention, ffn, 1 - same_layer / tokens, 1 - two_layers / tokens)
