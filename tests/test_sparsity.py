"""Sparsity core: exact counts, N:M patterns, allocation rules, reconstruction order, determinism."""

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.capture import capture_layer_inputs
from lightning_prune.data.text import load_blocks
from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.sparsity import (
    InputStatistics,
    NMPattern,
    allocate,
    check_allocation,
    check_mixed,
    layer_statistic,
    measure_sparsity,
    mixed_patterns,
    parse_pattern,
    prunable_linears,
    prune_linear,
    row_counts,
    sparsify,
    topk_keep_mask,
)
from lightning_prune.sparsity.scores import collect_statistics

METHODS = ("magnitude", "wanda", "sparsegpt")


def test_row_counts_total_is_exact_and_rows_differ_by_at_most_one():
    counts = row_counts(10, 64, 0.7)
    assert int(counts.sum()) == round(0.7 * 640)
    assert int(counts.max() - counts.min()) <= 1


def test_topk_mask_meets_counts_exactly_even_with_ties():
    scores = torch.ones(5, 16)
    scores[:, :4] = 0.5
    counts = torch.tensor([0, 3, 4, 7, 16])
    keep = topk_keep_mask(scores, counts)
    assert (keep.sum(1) == 16 - counts).all()
    assert not keep[2, :4].any() and keep[2, 4:].all()


@pytest.mark.parametrize("allocation", ["uniform", "owl", "dlp"])
@pytest.mark.parametrize(("method", "options"), [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("sparsegpt", {"mask_rule": "row"})])
def test_global_sparsity_and_exact_counts(method, options, allocation):
    """Exact per-row counts, except SparseGPT's default block rule: exact per-matrix totals."""
    model = make_tiny_model("llama")
    result = sparsify(model, random_ids(4, 32), method=method, allocation=allocation, sparsity=0.7, alpha=0.1, progress=False, **options)
    assert abs(measure_sparsity(model)["overall"] - 0.7) < 1e-3
    assert abs(sum(result.layer_sparsity) / len(result.layer_sparsity) - 0.7) < 1e-9
    per_matrix = method == "sparsegpt" and not options
    for name, linear in prunable_linears(model):
        target = result.layer_sparsity[int(name.split(".")[1])]
        expected = row_counts(*linear.weight.shape, target)
        pruned = (~result.masks[name]).sum(1)
        if per_matrix:
            assert int(pruned.sum()) == int(expected.sum()), name
        else:
            assert torch.equal(pruned, expected), name
        assert (linear.weight[~result.masks[name]] == 0).all()


@pytest.mark.parametrize("family", ["opt", "qwen2_sliding", "qwen3"])
def test_other_families_reach_target(family):
    model = make_tiny_model(family)
    sparsify(model, random_ids(2, 16), method="wanda", allocation="dlp", sparsity=0.6, alpha=0.1, progress=False)
    assert abs(measure_sparsity(model)["overall"] - 0.6) < 1e-3


def _assert_nm(mask: torch.Tensor, pattern: NMPattern):
    groups = mask.reshape(mask.shape[0], -1, pattern.m).sum(-1)
    assert (groups == pattern.n).all()


@pytest.mark.parametrize("structure", ["2:4", "4:8"])
@pytest.mark.parametrize("method", METHODS)
def test_nm_patterns_are_valid(method, structure):
    pattern = parse_pattern(structure)
    model = make_tiny_model("llama")
    result = sparsify(model, random_ids(2, 16), method=method, pattern=pattern, progress=False)
    for name, linear in prunable_linears(model):
        _assert_nm(result.masks[name], pattern)
        assert (linear.weight[~result.masks[name]] == 0).all()
    assert measure_sparsity(model)["overall"] == pytest.approx(pattern.sparsity, abs=1e-3)


def test_dlp_mixed_nm_varies_n_and_keeps_total():
    pattern = NMPattern(2, 4)
    model = make_tiny_model("llama")
    result = sparsify(model, random_ids(2, 16), method="wanda", allocation="dlp", pattern=pattern, alpha=0.2, progress=False)
    ns = [int(p.split(":")[0]) for p in result.layer_patterns]
    assert len(set(ns)) > 1 and sum(ns) == 2 * len(ns)
    for name, _ in prunable_linears(model):
        _assert_nm(result.masks[name], NMPattern(ns[int(name.split(".")[1])], 4))
    assert measure_sparsity(model)["overall"] == pytest.approx(0.5, abs=1e-9)


def test_mixed_patterns_largest_remainder_and_errors():
    assert mixed_patterns([0.3, 0.5, 0.7], NMPattern(2, 4)) == [NMPattern(3, 4), NMPattern(2, 4), NMPattern(1, 4)]
    with pytest.raises(InputError, match="outside 1..3"):
        mixed_patterns([0.6, 0.75, 0.9], NMPattern(1, 4))
    with pytest.raises(InputError, match="cannot vary N"):
        check_mixed(NMPattern(3, 4))
    with pytest.raises(InputError, match="too small"):
        mixed_patterns([0.45, 0.5, 0.55], NMPattern(2, 4))


def test_dlp_allocation_known_answer():
    # S = [1, 2, 3] -> I = [5/6, 4/6, 3/6] -> d = [2a, a, 0], mean a -> p + a - d
    assert allocate("dlp", [1.0, 2.0, 3.0], 0.5, 0.1) == pytest.approx([0.4, 0.5, 0.6])
    assert allocate("owl", [0.1, 0.3, 0.2], 0.5, 0.08) == pytest.approx([0.58, 0.42, 0.5])
    assert allocate("uniform", [0.0] * 3, 0.5, None) == [0.5] * 3
    assert layer_statistic("dlp", torch.tensor([1.0, 9.0, 2.0])) == 2.0
    assert layer_statistic("owl", torch.tensor([1.0] * 9 + [100.0])) == pytest.approx(0.1)


def test_allocations_average_to_target_on_random_statistics():
    values = torch.rand(30, generator=torch.Generator().manual_seed(0)).tolist()
    for allocation, alpha in (("dlp", 0.15), ("owl", 0.08)):
        result = allocate(allocation, values, 0.7, alpha)
        assert sum(result) / 30 == pytest.approx(0.7, abs=1e-12)
        assert max(result) - min(result) == pytest.approx(2 * alpha)


def test_planted_outliers_reconstruction_order():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2048, 128, generator=generator)
    inputs[:, :6] *= 25.0  # planted outlier features
    inputs = inputs @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=generator) / 128**0.5)
    errors = {}
    for method in METHODS:
        linear = torch.nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
        dense = linear(inputs).detach()
        stats = InputStatistics(128, hessian=True)
        stats.update(inputs)
        prune_linear(linear, method, 0.5, stats)
        errors[method] = float((linear(inputs).detach() - dense).square().sum())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    linear = torch.nn.Linear(64, 32, bias=False)
    weight = linear.weight.detach().clone()
    stats = InputStatistics(64, hessian=True)
    stats.update(torch.randn(256, 64))
    keep = prune_linear(linear, "sparsegpt", 0.0, stats)
    assert keep.all() and torch.allclose(linear.weight, weight, atol=1e-5)


def test_sequential_equals_naive_full_forward_reference():
    """Statistics of layer l come from inputs through the already pruned layers 0..l-1."""
    ids = random_ids(2, 16)
    fast = make_tiny_model("llama")
    sparsify(fast, ids, method="wanda", sparsity=0.5, progress=False)
    naive = make_tiny_model("llama")
    anatomy = Anatomy(naive)
    for layer in anatomy.layers:
        linears = anatomy.linears(layer)
        with collect_statistics(linears, hessian=False) as stats, torch.no_grad():
            naive(input_ids=ids)
        for role, linear in linears.items():
            prune_linear(linear, "wanda", 0.5, stats[role])
    for (name, a), (_, b) in zip(prunable_linears(fast), prunable_linears(naive)):
        assert torch.equal(a.weight != 0, b.weight != 0), name
        assert torch.allclose(a.weight, b.weight)


def test_capture_feeds_all_positions():
    inputs = capture_layer_inputs(make_tiny_model("llama"), random_ids(4, 16).split(2), 0)
    assert len(inputs) == 2


def test_determinism_with_seed(tiny_tokenizer):
    def run(seed):
        model = make_tiny_model("llama")
        blocks = load_blocks(tiny_tokenizer, "wikitext2", split="validation", seq_len=32, num_samples=4, seed=seed)
        return sparsify(model, blocks, method="sparsegpt", allocation="dlp", sparsity=0.6, alpha=0.1, progress=False)

    first, second, other = run(0), run(0), run(1)
    assert first.layer_sparsity == second.layer_sparsity
    assert all(torch.equal(first.masks[k], second.masks[k]) for k in first.masks)
    assert first.layer_sparsity != other.layer_sparsity


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "outside \\[0, 1\\)"),
        ({"sparsity": -0.1}, "outside \\[0, 1\\)"),
        ({"allocation": "dlp", "alpha": 0.0}, "outside \\(0, 0.5\\]"),
        ({"allocation": "dlp", "alpha": 0.6}, "outside \\(0, 0.5\\]"),
        ({"allocation": "dlp", "sparsity": 0.1, "alpha": 0.15}, "too large"),
        ({"allocation": "owl", "sparsity": 0.9, "alpha": 0.1}, "too large"),
        ({"allocation": "global"}, "allocation 'global' is not known"),
        ({"method": "random"}, "method 'random' is not known"),
        ({"pattern": NMPattern(2, 3)}, "divisible by 3"),
        ({"method": "wanda", "blocks": None}, "needs calibration data"),
    ],
)
def test_bad_settings_raise_input_error(kwargs, message):
    kwargs = {"blocks": random_ids(2, 8), **kwargs}
    with pytest.raises(InputError, match=message):
        sparsify(make_tiny_model("llama"), kwargs.pop("blocks"), progress=False, **kwargs)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "two:four", "2-4"])
def test_bad_patterns(text):
    with pytest.raises(InputError):
        parse_pattern(text)


def test_check_allocation_default_alpha():
    assert check_allocation("dlp", 0.7, None) == 0.15
    assert check_allocation("owl", 0.7, None) == 0.08
    assert check_allocation("uniform", 0.0, 0.3) is None


@pytest.mark.slow
def test_smollm2_wanda_dlp_reaches_target():
    from lightning_prune.evaluation.perplexity import perplexity
    from lightning_prune.model.loading import load_model

    model, tokenizer = load_model("demo")
    blocks = load_blocks(tokenizer, "c4", split="validation", seq_len=64, num_samples=4, seed=0)
    result = sparsify(model, blocks, method="wanda", allocation="dlp", sparsity=0.5, alpha=0.04, progress=False)
    assert abs(measure_sparsity(model)["overall"] - 0.5) < 1e-3
    assert len(result.layer_sparsity) == 30 and max(result.layer_sparsity) - min(result.layer_sparsity) == pytest.approx(0.08)
    evaluation = load_blocks(tokenizer, "wikitext2", split="test", seq_len=64, num_samples=4)
    assert perplexity(model, evaluation, progress=False) < 1e3
