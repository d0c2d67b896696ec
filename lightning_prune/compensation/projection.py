"""GradMAP stage 2 (001 §3, Eq. 8-13): one learned projection W' folded into a down-projection.

After pruning, the retained layer i* whose output mean drifts most from the original model's
(δ_i = ‖E[H_i] − E[H'_i]‖₂, Eq. 8-9) gets W' ∈ R^{d×d} minimising
‖W' W_down X_down + X_F − X_O‖² + λ‖W' − I‖²_F (Eq. 10-12), where X_O is the original output
of i*, X_F its post-attention residual in the pruned model and X_down the input of its
down-projection. It is folded as Ŵ_down = W' W_down (Eq. 13).

With Y = W_down X_down and R = X_O − X_F − b_down (tokens × D) the objective, scaled as in
:func:`learn_projection` (mean over the n·D entries), is ridge regression towards I:

    L(W') = ‖Y W'ᵀ − R‖²_F / (nD) + λ‖W' − I‖²_F,
    ∇ = 0  ⇔  (YᵀY/(nD) + λI) W'ᵀ = YᵀR/(nD) + λI,

solved in float64 by :func:`ridge_projection` (solver ``closed_form``, the default), with λ
picked from a small grid by the error on held-out calibration tokens (:func:`solve_projection`).
The paper's Adam run (lr 1e-3, λ = 1e-3; App. A.2) is kept as solver ``adam``
(:func:`learn_projection`).
"""

import copy

import torch
from torch import nn

from lightning_prune.capture import capture
from lightning_prune.compensation.magnitude import check_foldable
from lightning_prune.errors import InputError
from lightning_prune.importance.base import ScoringOptions, batches_of, evaluating
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import remove_layers

__all__ = [
    "SOLVERS",
    "REG_GRID",
    "output_means",
    "layer_drift",
    "reconstruction_data",
    "learn_projection",
    "check_projection_tokens",
    "ridge_projection",
    "solve_projection",
    "fold_projection",
    "ProjectionCompensation",
]

SOLVERS = ("closed_form", "adam")
REG_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # contains the paper's λ = 1e-3 (001 App. A.2)


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


def learn_projection(
    y, r, *, steps: int = 200, lr: float = 1e-3, reg: float = 1e-3, tokens_per_step: int = 1024, seed: int = 0, reduce=None
):
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


def _summed(tensor: torch.Tensor, reduce) -> torch.Tensor:
    return reduce(tensor) if reduce else tensor


def check_projection_tokens(tokens: int, dim: int) -> None:
    """Refuse a closed-form fit of a (dim × dim) map from fewer than ``dim`` calibration tokens."""
    if tokens < dim:
        raise InputError(
            f"projection compensation (solver closed_form) has {tokens} calibration tokens for a {dim}x{dim} map; "
            f"give at least {dim} tokens (more calibration samples or a longer sequence length)"
        )


@torch.no_grad()
def ridge_projection(y: torch.Tensor, r: torch.Tensor, reg: float, *, reduce=None) -> torch.Tensor:
    """W' = argmin ‖Y W'ᵀ − R‖²_F/(nD) + reg‖W' − I‖²_F, by one float64 linear solve.

    Args:
        y: Y = W_down X_down, shape (n, D) (this rank's tokens).
        r: R = X_O − X_F − b_down, shape (n, D).
        reg: λ > 0 (λ = 0 needs YᵀY of full rank).
        reduce: sums a tensor over ranks (DDP); the moments YᵀY, YᵀR and n are summed.

    Returns:
        W', shape (D, D), float64.
    """
    dim = y.shape[1]
    y64, r64 = y.double(), r.double()
    gram, cross = _summed(y64.T @ y64, reduce), _summed(y64.T @ r64, reduce)
    count = float(_summed(torch.tensor(float(len(y)), dtype=torch.float64), reduce))
    check_projection_tokens(int(count), dim)
    scale, eye = count * dim, torch.eye(dim, dtype=torch.float64)
    return torch.linalg.solve(gram / scale + reg * eye, cross / scale + reg * eye).T


@torch.no_grad()
def _heldout_error(y, r, reg: float, split: int, reduce) -> float:
    """Mean squared error on tokens ``split:`` of the ridge fit on tokens ``:split``."""
    weight = ridge_projection(y[:split], r[:split], reg, reduce=reduce)
    squared = ((y[split:].double() @ weight.T - r[split:].double()) ** 2).sum()
    totals = _summed(torch.stack([squared, torch.tensor(float(r[split:].numel()), dtype=torch.float64)]), reduce)
    return float(totals[0] / totals[1])


@torch.no_grad()
def solve_projection(y, r, *, reg_grid=REG_GRID, holdout: float = 0.25, reduce=None):
    """Closed-form W' with λ chosen on held-out tokens; returns (W', loss before, loss after, λ, errors).

    Each λ of ``reg_grid`` is fitted on the first ``1 − holdout`` of this rank's tokens and
    scored on the rest (the last ``holdout`` fraction); the best λ is refitted on all tokens.

    Args:
        y, r: as in :func:`ridge_projection`, shape (n, D).
        reg_grid: candidate λ values, each > 0.
        holdout: held-out fraction of the tokens, in (0, 1).
        reduce: sums over ranks (DDP).

    Returns:
        W' (D, D) fp32, MSE of R before and after (this rank's tokens, as :func:`learn_projection`),
        the chosen λ and the held-out MSE per λ.
    """
    if not 0 < holdout < 1:
        raise InputError(f"holdout {holdout} must be in (0, 1); it is the fraction of calibration tokens kept out to choose reg")
    if not reg_grid or any(not reg > 0 for reg in reg_grid):
        raise InputError(f"reg_grid {list(reg_grid)} must be a non-empty list of values > 0, e.g. {list(REG_GRID)}")
    count = int(_summed(torch.tensor(float(len(y)), dtype=torch.float64), reduce))
    check_projection_tokens(count, y.shape[1])
    split = max(1, min(len(y) - 1, round(len(y) * (1 - holdout))))
    errors = {float(reg): _heldout_error(y, r, reg, split, reduce) for reg in reg_grid}
    best = min(errors, key=errors.get)
    weight = ridge_projection(y, r, best, reduce=reduce).float()
    before = float(nn.functional.mse_loss(y, r))
    after = float(nn.functional.mse_loss(y @ weight.T, r))
    return weight, before, after, best, errors


@torch.no_grad()
def fold_projection(model: nn.Module, position: int, projection: torch.Tensor) -> None:
    """Ŵ_down = W' W_down (Eq. 13) at ``position``; the bias is left as is."""
    down = Anatomy(model).part(Anatomy(model).layers[position], "down_proj")
    down.weight.copy_((projection.to(down.weight.device) @ down.weight.float()).to(down.weight.dtype))


class ProjectionCompensation:
    """GradMAP stage 2: keep a copy of the original model, compensate once after all removals.

    Args:
        steps, lr, reg: the Adam solver's steps, learning rate and λ (paper: lr 1e-3, λ 1e-3).
        solver: ``closed_form`` (ridge solve, λ from ``reg_grid`` on held-out tokens) or ``adam``.
        reg_grid: closed form: candidate λ values.
        holdout: closed form: fraction of calibration tokens held out to choose λ.
    """

    name = "projection"

    def __init__(
        self,
        steps: int = 200,
        lr: float = 1e-3,
        reg: float = 1e-3,
        *,
        solver: str = "closed_form",
        reg_grid: tuple[float, ...] = REG_GRID,
        holdout: float = 0.25,
    ):
        if solver not in SOLVERS:
            raise InputError(f"projection solver {solver!r} is not known; choose one of {', '.join(SOLVERS)}")
        self.steps, self.lr, self.reg = steps, lr, reg
        self.solver, self.reg_grid, self.holdout = solver, tuple(reg_grid), holdout
        self.original = None

    def check(self, model: nn.Module) -> None:
        check_foldable(model, "projection compensation")

    def start(self, model: nn.Module, blocks: torch.Tensor, options: ScoringOptions) -> None:
        """Refuse too few tokens for the closed form (before any removal), then copy the model."""
        if self.solver == "closed_form":
            tokens = options.reduce(torch.tensor(float(blocks.numel()), dtype=torch.float64))
            check_projection_tokens(int(tokens), Anatomy(model).hidden_size)
        self.original = copy.deepcopy(model)

    def remove(self, model: nn.Module, position: int, blocks: torch.Tensor, options: ScoringOptions) -> dict:
        remove_layers(model, [position])
        return {"position": position}

    def finish(self, model: nn.Module, blocks: torch.Tensor, kept: list[int], options: ScoringOptions) -> dict:
        """Pick the max-drift retained layer, learn W' for it and fold it; returns what was done."""
        drift = layer_drift(output_means(self.original, blocks, options), output_means(model, blocks, options), kept)
        position = int(drift.argmax())
        y, r = reconstruction_data(self.original, model, blocks, position, kept[position], options)
        projection, before, after, extra = self._solve(y, r, options)
        fold_projection(model, position, projection)
        self.original = None
        return {"layer": kept[position], "drift": drift.tolist(), "loss_before": before, "loss_after": after, **extra}

    def _solve(self, y: torch.Tensor, r: torch.Tensor, options: ScoringOptions):
        """(W', loss before, loss after, record entries) with the configured solver."""
        if self.solver == "adam":
            projection, before, after = learn_projection(
                y, r, steps=self.steps, lr=self.lr, reg=self.reg, seed=options.seed, reduce=options.reduce
            )
            return projection, before, after, {"solver": "adam", "reg": self.reg}
        projection, before, after, reg, errors = solve_projection(y, r, reg_grid=self.reg_grid, holdout=self.holdout, reduce=options.reduce)
        return projection, before, after, {"solver": "closed_form", "reg": reg, "heldout_mse": {str(k): v for k, v in errors.items()}}
