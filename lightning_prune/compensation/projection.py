"""GradMAP stage 2 (001 §3, Eq. 8-13): one learned projection W' folded into a down-projection.

After pruning, the retained layer i* whose output mean drifts most from the original model's
(δ_i = ‖E[H_i] − E[H'_i]‖₂, Eq. 8-9) gets W' ∈ R^{d×d}, initialised to I and trained with Adam
(lr 1e-3) on ‖W' W_down X_down + X_F − X_O‖² + λ‖W' − I‖²_F (λ = 1e-3; Eq. 10-12, App. A.2),
where X_O is the original output of i*, X_F its post-attention residual in the pruned model
and X_down the input of its down-projection. It is folded as Ŵ_down = W' W_down (Eq. 13).
"""

import copy

import torch
from torch import nn

from lightning_prune.capture import capture
from lightning_prune.compensation.magnitude import check_foldable
from lightning_prune.importance.base import ScoringOptions, batches_of, evaluating
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import remove_layers

__all__ = ["output_means", "layer_drift", "reconstruction_data", "learn_projection", "fold_projection", "ProjectionCompensation"]


@torch.no_grad()
def output_means(model: nn.Module, blocks: torch.Tensor, options: ScoringOptions) -> torch.Tensor:
    """E over calibration tokens of every layer's output, shape (num_layers, D), fp32, reduced over ranks."""
    device = next(model.parameters()).device
    anatomy = Anatomy(model)
    sums = torch.zeros(anatomy.num_layers, anatomy.hidden_size, dtype=torch.float64)
    with evaluating(model):
        for batch in batches_of(blocks, options.batch_size):
            with capture(model, inputs=False) as record:
                model(input_ids=batch.to(device), use_cache=False)
            for position, outputs in record.outputs.items():
                sums[position] += outputs[0].double().sum(dim=(0, 1)).cpu()
    tokens = options.reduce(torch.tensor(float(blocks.numel()), dtype=torch.float64))
    return (options.reduce(sums) / tokens).float()


def layer_drift(original_means: torch.Tensor, pruned_means: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """δ_i (Eq. 8) for each retained layer, in pruned positions: ‖mean_orig[kept[i]] − mean_pruned[i]‖₂."""
    return (original_means[kept] - pruned_means).norm(dim=-1)


@torch.no_grad()
def reconstruction_data(original: nn.Module, model: nn.Module, blocks, position: int, original_position: int, options):
    """(Y, R), both (tokens, D): Y = W_down X_down and R = X_O − X_F − b_down at layer ``position``."""
    device = next(model.parameters()).device
    down = Anatomy(model).part(Anatomy(model).layers[position], "down_proj")
    bias = down.bias.float() if down.bias is not None else 0.0
    ys, rs = [], []
    with evaluating(model), evaluating(original):
        for batch in batches_of(blocks, options.batch_size):
            batch = batch.to(device)
            with capture(original, [original_position], inputs=False) as target:
                original(input_ids=batch, use_cache=False)
            with capture(model, [position], inputs=False) as pruned:
                down_inputs = []
                handle = down.register_forward_pre_hook(lambda m, args: down_inputs.append(args[0].detach()))
                try:
                    model(input_ids=batch, use_cache=False)
                finally:
                    handle.remove()
            y = nn.functional.linear(down_inputs[0].float(), down.weight.float()).flatten(0, 1)
            x_f = pruned.outputs[position][0].float().flatten(0, 1) - y - bias
            ys.append(y.cpu())
            rs.append((target.outputs[original_position][0].float().flatten(0, 1) - x_f - bias).cpu())
    return torch.cat(ys), torch.cat(rs)


def learn_projection(y, r, *, steps: int = 200, lr: float = 1e-3, reg: float = 1e-3, tokens_per_step: int = 1024, seed: int = 0, reduce=None):
    """Adam on mean((Y W'ᵀ − R)²) + reg‖W' − I‖²_F from W' = I (Eq. 10-12); returns (W', loss before, loss after)."""
    dim = y.shape[1]
    eye = torch.eye(dim)
    weight = nn.Parameter(eye.clone())
    optimizer = torch.optim.Adam([weight], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    world = float(reduce(torch.tensor(1.0))) if reduce else 1.0
    for _ in range(steps):
        rows = torch.randint(0, len(y), (min(tokens_per_step, len(y)),), generator=generator)
        loss = nn.functional.mse_loss(y[rows] @ weight.T, r[rows]) + reg * (weight - eye).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        if reduce:
            weight.grad = reduce(weight.grad) / world
        optimizer.step()
    with torch.no_grad():
        before = float(nn.functional.mse_loss(y, r))
        after = float(nn.functional.mse_loss(y @ weight.T, r))
    return weight.detach(), before, after


@torch.no_grad()
def fold_projection(model: nn.Module, position: int, projection: torch.Tensor) -> None:
    """Ŵ_down = W' W_down (Eq. 13) at ``position``; the bias is left as is."""
    down = Anatomy(model).part(Anatomy(model).layers[position], "down_proj")
    down.weight.copy_((projection.to(down.weight.device) @ down.weight.float()).to(down.weight.dtype))


class ProjectionCompensation:
    """GradMAP stage 2: keep a copy of the original model, compensate once after all removals."""

    name = "projection"

    def __init__(self, steps: int = 200, lr: float = 1e-3, reg: float = 1e-3):
        self.steps, self.lr, self.reg = steps, lr, reg
        self.original = None

    def check(self, model: nn.Module) -> None:
        check_foldable(model, "projection compensation")

    def start(self, model: nn.Module, blocks: torch.Tensor, options: ScoringOptions) -> None:
        self.original = copy.deepcopy(model)

    def remove(self, model: nn.Module, position: int, blocks: torch.Tensor, options: ScoringOptions) -> dict:
        remove_layers(model, [position])
        return {"position": position}

    def finish(self, model: nn.Module, blocks: torch.Tensor, kept: list[int], options: ScoringOptions) -> dict:
        """Pick the max-drift retained layer, learn W' for it and fold it; returns what was done."""
        drift = layer_drift(output_means(self.original, blocks, options), output_means(model, blocks, options), kept)
        position = int(drift.argmax())
        y, r = reconstruction_data(self.original, model, blocks, position, kept[position], options)
        projection, before, after = learn_projection(
            y, r, steps=self.steps, lr=self.lr, reg=self.reg, seed=options.seed, reduce=options.reduce
        )
        fold_projection(model, position, projection)
        self.original = None
        return {"layer": kept[position], "drift": drift.tolist(), "loss_before": before, "loss_after": after}
