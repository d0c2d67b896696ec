"""Weight scores for unstructured pruning, and the input statistics they need.

- magnitude: ``|W_ij|``, compared within each output row (``magnitude_scope="row"``) or over
  the whole matrix (``"matrix"``, the Magnitude baseline of 003 §4.1 and the authors' code).
- Wanda (003 Eq. 3, Sun et al. 2024): ``|W_ij| · ‖X_j‖₂``, compared within each output row.
- SparseGPT (003 Eq. 2, Frantar & Alistarh 2023) needs the Hessian ``H = 2XᵀX/n``; its
  pruning with OBS weight updates lives in :mod:`lightning_prune.sparsity.sparsegpt`.

Statistics are accumulated in fp32 by forward hooks on each linear
(:class:`InputStatistics`), so one pass over the calibration tokens serves all of a
decoder layer's projections.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_prune.errors import InputError

__all__ = [
    "MAGNITUDE_SCOPES",
    "METHODS",
    "InputStatistics",
    "check_magnitude_scope",
    "collect_statistics",
    "magnitude_scores",
    "wanda_scores",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
MAGNITUDE_SCOPES = ("row", "matrix")


def check_magnitude_scope(magnitude_scope: str) -> None:
    """Raise :class:`InputError` unless ``magnitude_scope`` is one of :data:`MAGNITUDE_SCOPES`.

    ``"row"`` compares ``|W_ij|`` within each output row (exact per-row counts, as Wanda does
    for its own score); ``"matrix"`` takes one threshold over the whole projection — this is
    the "Magnitude" baseline of 003 (§4.1, Tables 3/10; the authors' code, like Wanda's, sorts
    the flattened ``|W|`` of each projection).
    """
    if magnitude_scope not in MAGNITUDE_SCOPES:
        raise InputError(
            f"magnitude_scope={magnitude_scope!r} is not known; choose 'row' (per output row) or "
            "'matrix' (one threshold per projection, 003's Magnitude baseline)"
        )


class InputStatistics:
    """Running statistics of the inputs X (tokens × C_in) of one linear layer.

    Each batch's sums are computed in fp32 and accumulated in fp64, so that sums over shards
    of the calibration data (one per rank, :meth:`all_reduce`) equal the sum over all of it to
    fp64 rounding.

    Attributes:
        squared_sum: (C_in,) Σ_tokens x_j² (fp64).
        gram: (C_in, C_in) Σ_tokens x xᵀ (fp64), kept only when ``hessian=True``.
        tokens: number of token rows seen.
    """

    def __init__(self, in_features: int, *, hessian: bool, device: torch.device | str = "cpu"):
        self.squared_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if hessian else None
        self.tokens = 0

    def update(self, inputs: torch.Tensor, products: "_BatchProducts | None" = None) -> None:
        """Add a batch of inputs (..., C_in); ``products`` computes each batch's sums once for linears fed the same tensor."""
        products = products if products is not None else _BatchProducts()
        rows, squared = products.sums(inputs)
        self.squared_sum += squared
        if self.gram is not None:
            self.gram += products.gram()
        self.tokens += rows.shape[0]

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every sum and the token count by its sum over ranks (``reduce`` sums a tensor)."""
        self.squared_sum = reduce(self.squared_sum)
        if self.gram is not None:
            self.gram = reduce(self.gram)
        self.tokens = int(reduce(torch.tensor(float(self.tokens), dtype=torch.float64)))

    @property
    def column_norms(self) -> torch.Tensor:
        """(C_in,) ‖X_j‖₂ / √n in fp32 — Wanda's feature norm up to a factor common to all weights."""
        return (self.squared_sum / max(self.tokens, 1)).sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        """(C_in, C_in) H = 2XᵀX / n (fp64), SparseGPT's layer-wise reconstruction Hessian."""
        return self.gram * (2.0 / max(self.tokens, 1))


class _BatchProducts:
    """The fp32 rows, squared column sums and Gram matrix of the last input tensor seen.

    Linears that are fed the very same tensor (the same object, not changed in place since:
    its version counter) reuse them; any other tensor replaces them. The Gram matrix is
    computed only when asked for, so Wanda's statistics never pay for it.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._input, self._version, self._rows, self._squared, self._gram = None, None, None, None, None

    def sums(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (tokens × C_in, fp32), Σ_tokens x_j²) of ``inputs``."""
        if inputs is not self._input or inputs._version != self._version:
            rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
            self._input, self._version, self._rows, self._squared, self._gram = inputs, inputs._version, rows, rows.square().sum(0), None
        return self._rows, self._squared

    def gram(self) -> torch.Tensor:
        """XᵀX (fp32) of the rows of the last :meth:`sums`."""
        if self._gram is None:
            self._gram = self._rows.T @ self._rows
        return self._gram


@contextmanager
def collect_statistics(
    linears: dict[str, nn.Module], *, hessian: bool, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Iterator[dict[str, InputStatistics]]:
    """Forward hooks that fill one :class:`InputStatistics` per named linear while the block runs.

    With ``reduce`` (DDP: a sum over ranks) the statistics are all-reduced when the block ends,
    so every rank leaves with the statistics of all ranks' calibration shards.
    """
    stats = {name: InputStatistics(module.in_features, hessian=hessian, device=module.weight.device) for name, module in linears.items()}
    products = _BatchProducts()  # q/k/v (and gate/up) receive one tensor: its XᵀX is computed once, not per linear
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: stats[name].update(args[0], products))
        for name, module in linears.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        products.clear()
    if reduce is not None:
        for name in sorted(stats):  # the same collective order on every rank
            stats[name].all_reduce(reduce)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in) ``|W|`` in fp32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """(C_out, C_in) ``|W_ij| · ‖X_j‖₂`` in fp32 (003 Eq. 3)."""
    return weight.detach().float().abs() * stats.column_norms.to(weight.device)[None, :]
