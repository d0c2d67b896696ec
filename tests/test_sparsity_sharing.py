"""SparseGPT's shared work and its compact decision: one XᵀX and one inverse factor per distinct input, kept values only."""

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.model.anatomy import Anatomy
from lightning_prune.sparsity import InputStatistics, NMPattern, prunable_linears, reconstruction_error, sparsegpt_prune
from lightning_prune.sparsity import sequential as sequential_module
from lightning_prune.sparsity.scores import collect_statistics
from lightning_prune.sparsity.sparsegpt import _prune_block, inverse_hessian_factor
from lightning_prune.stages import SparsifyStage
from lightning_prune.stages.sparsify import SparsityDecision


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.int32)


def _column_by_column(block, factor, keep, pattern):
    """The reference order: one rank-1 update of the whole rest of the block per column."""
    pruned, errors = torch.zeros_like(block), torch.zeros_like(block)
    diagonal = torch.diagonal(factor)
    for i in range(block.shape[1]):
        if pattern is not None and i % pattern.m == 0:
            group = block[:, i : i + pattern.m].square() / diagonal[i : i + pattern.m].square()
            drop = group.topk(pattern.m - pattern.n, dim=1, largest=False).indices
            keep[:, i : i + pattern.m] = True
            keep[:, i : i + pattern.m].scatter_(1, drop, False)
        column = block[:, i]
        kept = column * keep[:, i]
        pruned[:, i] = kept
        error = (column - kept) / factor[i, i]
        block[:, i:] -= error[:, None] * factor[i, i:][None, :]
        errors[:, i] = error
    return pruned, errors


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4), NMPattern(3, 8)])
def test_inner_steps_make_the_same_updates_as_column_by_column(pattern):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 96, generator=generator)
    factor = inverse_hessian_factor(2 * inputs.T @ inputs / 512)
    block = torch.randn(40, 96, generator=generator)
    keep = torch.rand(40, 96, generator=generator) > 0.5 if pattern is None else torch.ones(40, 96, dtype=torch.bool)
    keep_ref = keep.clone()
    pruned, errors = _prune_block(block.clone(), factor, keep, pattern)
    pruned_ref, errors_ref = _column_by_column(block.clone(), factor, keep_ref, pattern)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(pruned, pruned_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(errors, errors_ref, rtol=1e-5, atol=1e-5)
    assert bool((pruned[~keep] == 0).all())


def test_linears_fed_one_tensor_share_their_sums():
    model = make_tiny_model("llama")
    anatomy = Anatomy(model)
    linears = anatomy.linears(anatomy.layers[0])
    separate = {role: InputStatistics(linear.in_features, hessian=True) for role, linear in linears.items()}
    hooks = [
        linear.register_forward_pre_hook(lambda m, args, role=role: separate[role].update(args[0])) for role, linear in linears.items()
    ]
    with collect_statistics(linears, hessian=True) as shared, torch.no_grad():
        model(input_ids=random_ids(2, 16))
        model(input_ids=random_ids(2, 16, seed=1))
    for hook in hooks:
        hook.remove()
    for role in linears:
        assert shared[role].tokens == separate[role].tokens == 64
        assert torch.equal(shared[role].gram, separate[role].gram), role
        assert torch.equal(shared[role].squared_sum, separate[role].squared_sum), role
    assert torch.equal(shared["q_proj"].gram, shared["v_proj"].gram)
    assert torch.equal(shared["gate_proj"].gram, shared["up_proj"].gram)


def test_a_tensor_changed_in_place_is_not_taken_for_the_same_input():
    linears = {"a": torch.nn.Linear(8, 4), "b": torch.nn.Linear(8, 4)}
    x = torch.randn(5, 8)
    with collect_statistics(linears, hessian=True) as stats, torch.no_grad():
        linears["a"](x)
        x.mul_(2.0)
        linears["b"](x)
    assert torch.allclose(stats["b"].gram, 4 * stats["a"].gram)


def test_inverse_factor_is_computed_once_per_distinct_input(monkeypatch):
    calls = []
    real = sequential_module.inverse_hessian_factor
    monkeypatch.setattr(sequential_module, "inverse_hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_tiny_model("llama")
    sequential_module.sparsify(model, random_ids(4, 16), method="sparsegpt", sparsity=0.5, progress=False)
    # per layer: q/k/v, o, gate/up, down
    assert len(calls) == 4 * Anatomy(model).num_layers


def test_shared_factor_equals_own_factor():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(256, 32, generator=generator)
    hessian = 2 * inputs.T.double() @ inputs.double() / 256
    weight = torch.randn(16, 32, generator=generator)
    counts = torch.full((16,), 16)
    own = sparsegpt_prune(weight, hessian, counts=counts)
    shared = sparsegpt_prune(weight, hessian, counts=counts, factor=inverse_hessian_factor(hessian))
    assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])
    assert reconstruction_error(weight, own[0], hessian) < 1


@pytest.mark.parametrize("structure", [None, "2:4"])
def test_sparsegpt_decision_holds_kept_values_and_replays_bit_for_bit(structure):
    blocks = random_ids(4, 16)
    live = make_tiny_model("llama")
    stage = SparsifyStage(method="sparsegpt", allocation="uniform", sparsity=None if structure else 0.6, structure=structure, batch_size=2)
    decision = stage.plan(live, blocks, progress=False)
    assert not decision.weights and set(decision.kept) == set(decision.masks)
    for name in decision.masks:
        assert decision.kept[name].dim() == 1 and decision.kept[name].numel() == decision.masks.kept(name)
    tensors = decision.tensors()
    assert not any(key.startswith("weight.") for key in tensors)
    replayed = make_tiny_model("llama")
    SparsityDecision.from_json(decision.to_json(), tensors).apply(replayed)
    for (name, a), (_, b) in zip(prunable_linears(live), prunable_linears(replayed)):
        assert torch.equal(_bits(a.weight), _bits(b.weight)), name  # +0.0 where pruned on both sides
    for (name, a), (_, b) in zip(live.named_parameters(), replayed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_plan_with_whole_weights_still_replays():
    blocks = random_ids(4, 16)
    live = make_tiny_model("llama")
    decision = SparsifyStage(method="sparsegpt", allocation="uniform", sparsity=0.5, batch_size=2).plan(live, blocks, progress=False)
    tensors = {key: value for key, value in decision.tensors().items() if not key.startswith("kept.")}
    tensors.update({f"weight.{name}": linear.weight.detach().clone() for name, linear in prunable_linears(live)})
    replayed = make_tiny_model("llama")
    old = SparsityDecision.from_json(decision.to_json(), tensors)
    assert old.weights and not old.kept
    old.apply(replayed)
    for (name, a), (_, b) in zip(prunable_linears(live), prunable_linears(replayed)):
        assert torch.equal(a.weight, b.weight), name


def test_kept_values_that_do_not_fit_the_mask_are_refused():
    from lightning_prune.errors import InputError

    live = make_tiny_model("llama")
    decision = SparsifyStage(method="sparsegpt", allocation="uniform", sparsity=0.5, batch_size=2).plan(
        live, random_ids(4, 16), progress=False
    )
    tensors = decision.tensors()
    name = next(iter(decision.kept))
    tensors[f"kept.{name}"] = tensors[f"kept.{name}"][:-1]
    with pytest.raises(InputError, match="kept weights"):
        SparsityDecision.from_json(decision.to_json(), tensors).apply(make_tiny_model("llama"))
