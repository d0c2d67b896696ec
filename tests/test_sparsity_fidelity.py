"""Fidelity to the reference code (issue 15 item 4): SparseGPT's block mask, magnitude's scope,
DLP's statistic and α table, OWL's M, mixed N:M defaults."""

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.errors import InputError
from lightning_prune.sparsity import (
    NMPattern,
    allocation_statistics,
    check_allocation,
    default_alpha,
    layer_statistic,
    measure_sparsity,
    prunable_linears,
    prune_linear,
    reconstruction_error,
    row_counts,
    sparsegpt_prune,
    sparsify,
)
from lightning_prune.sparsity.sparsegpt import inverse_hessian_factor

METHODS = ("magnitude", "wanda", "sparsegpt")


def _problem(rows: int = 24, cols: int = 64, tokens: int = 512, seed: int = 0):
    """A weight with rows of very different scales and a Hessian of correlated, outlier-heavy inputs."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tokens, cols, generator=generator)
    inputs[:, :3] *= 10.0
    inputs = inputs @ (torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=generator) / cols**0.5)
    scales = torch.exp(torch.randn(rows, 1, generator=generator))
    weight = torch.randn(rows, cols, generator=generator) * scales
    return weight, 2.0 * inputs.T @ inputs / tokens, inputs


def _reference_sparsegpt(weight, factor, sparsity, blocksize):
    """Transcription of the reference rule (SparseGPT §3, IST-DASLab fasterprune), mask by threshold.

    Per block: ``tmp = W1² / diag(Hinv1)²`` over all rows, ``thresh`` = the k-th smallest of the
    flattened block (k = the block's share, here ``numel·p``), prune ``tmp <= thresh``; then the
    OBS column loop and the lazy update of the later columns.
    """
    work = weight.clone().float()
    mask = torch.zeros_like(work, dtype=torch.bool)
    cols = work.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, hinv1 = work[:, i1:i2].clone(), factor[i1:i2, i1:i2]
        quantized, errors = torch.zeros_like(block), torch.zeros_like(block)
        tmp = block**2 / torch.diag(hinv1).reshape(1, -1) ** 2
        k = int(tmp.numel() * sparsity)
        block_mask = tmp <= torch.sort(tmp.flatten())[0][k - 1]
        for i in range(i2 - i1):
            w, d = block[:, i], hinv1[i, i]
            q = w.clone()
            q[block_mask[:, i]] = 0
            quantized[:, i] = q
            err = (w - q) / d
            block[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            errors[:, i] = err
        work[:, i1:i2] = quantized
        mask[:, i1:i2] = block_mask
        work[:, i2:] -= errors @ factor[i1:i2, i2:]
    return work, ~mask


def test_inverse_hessian_factor_matches_direct_computation():
    _, hessian, _ = _problem()
    damped = hessian.double() + 0.01 * hessian.diagonal().double().mean() * torch.eye(64, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.allclose(inverse_hessian_factor(hessian).double(), expected, rtol=1e-4, atol=1e-6)


def test_block_rule_equals_reference_transcription():
    weight, hessian, _ = _problem()
    factor = inverse_hessian_factor(hessian)
    counts = row_counts(*weight.shape, 0.5)
    new, keep = sparsegpt_prune(weight, hessian, counts=counts, blocksize=16)
    ref_new, ref_keep = _reference_sparsegpt(weight, factor, 0.5, 16)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new, ref_new, rtol=1e-4, atol=1e-4)
    assert int((~keep).sum()) == int(counts.sum())
    assert len(set((~keep).sum(1).tolist())) > 1  # rows are not forced to the same count


def test_row_rule_keeps_exact_row_counts_and_differs_from_block_rule():
    weight, hessian, _ = _problem()
    counts = row_counts(*weight.shape, 0.5)
    _, row_keep = sparsegpt_prune(weight, hessian, counts=counts, blocksize=16, mask_rule="row")
    _, block_keep = sparsegpt_prune(weight, hessian, counts=counts, blocksize=16, mask_rule="block")
    assert torch.equal((~row_keep).sum(1), counts)
    assert not torch.equal(row_keep, block_keep)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_rule_reconstructs_no_worse_than_row_rule(seed):
    weight, hessian, inputs = _problem(rows=48, cols=128, tokens=1024, seed=seed)
    counts = row_counts(*weight.shape, 0.6)
    errors = {}
    for rule in ("block", "row"):
        new, _ = sparsegpt_prune(weight, hessian, counts=counts, blocksize=32, mask_rule=rule)
        errors[rule] = reconstruction_error(weight, new, hessian)
        direct = float(((weight - new) @ inputs.T).square().sum() / (weight @ inputs.T).square().sum())
        assert errors[rule] == pytest.approx(direct, rel=1e-3)
    assert 0.0 < errors["block"] <= errors["row"]


def test_reconstruction_error_extremes():
    weight, hessian, _ = _problem()
    assert reconstruction_error(weight, weight, hessian) == 0.0
    assert reconstruction_error(weight, torch.zeros_like(weight), hessian) == pytest.approx(1.0)


def test_sparsify_sparsegpt_default_is_block_rule():
    ids = random_ids(2, 16)
    default, explicit_row = make_tiny_model("llama"), make_tiny_model("llama")
    first = sparsify(default, ids, method="sparsegpt", sparsity=0.6, progress=False)
    second = sparsify(explicit_row, ids, method="sparsegpt", sparsity=0.6, mask_rule="row", progress=False)
    assert measure_sparsity(default)["overall"] == pytest.approx(0.6, abs=1e-3)
    varying = 0
    for name, linear in prunable_linears(default):
        assert int((~first.masks[name]).sum()) == int(row_counts(*linear.weight.shape, 0.6).sum())
        assert torch.equal((~second.masks[name]).sum(1), row_counts(*linear.weight.shape, 0.6))
        varying += len(set((~first.masks[name]).sum(1).tolist())) > 1
    assert varying > 0


def test_bad_mask_rule_names_the_option():
    with pytest.raises(InputError, match="mask_rule='global'"):
        sparsify(make_tiny_model("llama"), random_ids(2, 8), method="sparsegpt", mask_rule="global", progress=False)


# --- magnitude: per-row or per-matrix comparison groups ----------------------------------------


def test_magnitude_matrix_scope_is_one_threshold_over_the_projection():
    linear = torch.nn.Linear(48, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 48, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 17)[:, None])
    weight = linear.weight.detach().clone()
    keep = prune_linear(linear, "magnitude", 0.5, None, magnitude_scope="matrix")
    threshold = weight.abs().flatten().kthvalue(16 * 48 // 2).values
    assert torch.equal(keep, weight.abs() > threshold)
    assert len(set((~keep).sum(1).tolist())) > 1  # large-scale rows keep more


def test_magnitude_row_scope_is_the_default():
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 17)[:, None]
    masks = {}
    for scope in (None, "row"):
        linear = torch.nn.Linear(48, 16, bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        options = {} if scope is None else {"magnitude_scope": scope}
        masks[scope] = prune_linear(linear, "magnitude", 0.5, None, **options)
    assert torch.equal(masks[None], masks["row"]) and ((~masks["row"]).sum(1) == 24).all()


def test_sparsify_magnitude_matrix_scope_reaches_target_without_data():
    model = make_tiny_model("llama")
    result = sparsify(model, None, method="magnitude", sparsity=0.7, magnitude_scope="matrix", progress=False)
    assert measure_sparsity(model)["overall"] == pytest.approx(0.7, abs=1e-3)
    for name, linear in prunable_linears(model):
        assert int((~result.masks[name]).sum()) == round(0.7 * linear.weight.numel())


def test_bad_magnitude_scope_names_the_option():
    with pytest.raises(InputError, match="magnitude_scope='layer'"):
        sparsify(make_tiny_model("llama"), None, method="magnitude", magnitude_scope="layer", progress=False)


# --- DLP's statistic (median or mean) and OWL's M -----------------------------------------------


def test_layer_statistic_options():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 100.0])
    assert layer_statistic("dlp", scores) == 3.0
    assert layer_statistic("dlp", scores, dlp_statistic="mean") == pytest.approx(23.2)
    assert layer_statistic("owl", scores) == 0.0  # nothing above 5 × 23.2
    assert layer_statistic("owl", scores, owl_m=2.0) == pytest.approx(0.2)
    assert layer_statistic("owl", scores, owl_m=0.4) == pytest.approx(0.4)


def test_sparsify_passes_statistic_options_to_the_allocation():
    ids = random_ids(2, 16)
    reference = allocation_statistics(make_tiny_model("llama"), ids, ("dlp", "owl"), dlp_statistic="mean", owl_m=2.0, progress=False)
    median = allocation_statistics(make_tiny_model("llama"), ids, ("dlp",), progress=False)["dlp"]
    mean = sparsify(make_tiny_model("llama"), ids, allocation="dlp", sparsity=0.6, alpha=0.1, dlp_statistic="mean", progress=False)
    owl = sparsify(make_tiny_model("llama"), ids, allocation="owl", sparsity=0.6, alpha=0.1, owl_m=2.0, progress=False)
    assert mean.layer_statistic == pytest.approx(reference["dlp"])
    assert owl.layer_statistic == pytest.approx(reference["owl"])
    assert mean.layer_statistic != pytest.approx(median)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"dlp_statistic": "max"}, "dlp_statistic='max'"), ({"owl_m": 0.0}, "owl_m=0.0"), ({"owl_m": -1}, "owl_m=-1")],
)
def test_bad_statistic_options_name_the_option(options, message):
    with pytest.raises(InputError, match=message):
        check_allocation("dlp", 0.5, None, **options)
    with pytest.raises(InputError, match=message):
        sparsify(make_tiny_model("llama"), random_ids(2, 8), allocation="owl", progress=False, **options)


# --- default α: 003 Table 19 for DLP, OWL's λ, mixed N:M ----------------------------------------


@pytest.mark.parametrize(
    ("allocation", "sparsity", "expected"),
    [
        ("dlp", 0.5, 0.04),
        ("dlp", 0.6, 0.10),
        ("dlp", 0.7, 0.15),
        ("dlp", 0.8, 0.12),
        ("dlp", 0.2, 0.02),
        ("dlp", 0.55, 0.04),  # halfway: the smaller α of the two neighbours
        ("dlp", 0.66, 0.15),
        ("dlp", 0.05, 0.05),  # 0.06 clamped to p
        ("dlp", 0.9, 0.099),  # 0.12 clamped below 1 - p
        ("owl", 0.5, 0.08),
        ("owl", 0.7, 0.08),
        ("owl", 0.05, 0.05),
    ],
)
def test_default_alpha_unstructured(allocation, sparsity, expected):
    assert default_alpha(allocation, sparsity) == pytest.approx(expected)
    assert check_allocation(allocation, sparsity, None) == pytest.approx(expected)


def test_default_alpha_mixed_nm_and_explicit_alpha_wins():
    assert check_allocation("owl", 0.5, None, pattern=NMPattern(2, 4)) == pytest.approx(0.15)
    assert check_allocation("dlp", 0.5, None, pattern=NMPattern(4, 8)) == pytest.approx(0.075)
    assert check_allocation("dlp", 0.5, 0.2, pattern=NMPattern(2, 4)) == 0.2
    assert check_allocation("uniform", 0.5, None, pattern=NMPattern(2, 4)) is None
    with pytest.raises(InputError, match="needs sparsity > 0"):
        check_allocation("dlp", 0.0, None)


@pytest.mark.parametrize("allocation", ["owl", "dlp"])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_2_4_with_default_alpha_works(method, allocation):
    model = make_tiny_model("llama")
    result = sparsify(model, random_ids(2, 16), method=method, allocation=allocation, pattern=NMPattern(2, 4), progress=False)
    ns = [int(p.split(":")[0]) for p in result.layer_patterns]
    assert len(set(ns)) > 1 and sum(ns) == 2 * len(ns) and 1 <= min(ns) and max(ns) <= 3
    for name, _ in prunable_linears(model):
        groups = result.masks[name].reshape(result.masks[name].shape[0], -1, 4).sum(-1)
        assert (groups == ns[int(name.split(".")[1])]).all(), name
    assert measure_sparsity(model)["overall"] == pytest.approx(0.5, abs=1e-9)
