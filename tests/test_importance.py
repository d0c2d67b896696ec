"""Importance metrics on tiny models: shapes, determinism, known answers, prefix reuse = naive."""

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.errors import InputError
from lightning_prune.importance import METRICS, ScoringOptions, get_metric, score_layers
from lightning_prune.importance.taylor import token_loss_sum
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.pruning import prune_layers
from lightning_prune.selection import one_shot, protected_positions

BLOCKS = random_ids(6, 24, seed=3)
DATA_METRICS = [name for name in METRICS if name != "accuracy"]


def options(**kwargs) -> ScoringOptions:
    return ScoringOptions(**{"progress": False, "batch_size": 4, **kwargs})


def make_identity(model, position: int):
    """Zero the residual-writing projections of one layer, so it returns its input unchanged."""
    anatomy = Anatomy(model)
    with torch.no_grad():
        for role in ("o_proj", "down_proj"):
            part = anatomy.part(anatomy.layers[position], role)
            part.weight.zero_()
            if part.bias is not None:
                part.bias.zero_()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding", "opt"])
@pytest.mark.parametrize("name", DATA_METRICS)
def test_every_metric_gives_one_fp32_score_per_layer_and_is_deterministic(family, name):
    tiny_model = make_tiny_model(family)
    first = score_layers(tiny_model, BLOCKS, name, options(block_size=2))
    second = score_layers(tiny_model, BLOCKS, name, options(block_size=2))
    assert first.shape == (6,) and first.dtype == torch.float32
    assert torch.equal(torch.nan_to_num(first, nan=-1.0), torch.nan_to_num(second, nan=-1.0))
    finite = first[:5] if name == "contiguous" else first
    assert torch.isfinite(finite).all()


def test_identity_layer_has_zero_block_influence_and_is_removed_first():
    model = make_identity(make_tiny_model("llama"), 3)
    scores = score_layers(model, BLOCKS, "bi", options())
    assert abs(float(scores[3])) < 1e-5
    assert (scores[[0, 1, 2, 4, 5]] > 0.01).all()
    assert one_shot(scores, 1, protected_positions(6))[0] == 3
    decisions = prune_layers(
        make_identity(make_tiny_model("llama"), 3), BLOCKS, metric="bi", selection="iterative", num_layers=2, options=options()
    )
    assert decisions["removed_layers"][0] == 3


def test_identity_layer_costs_nothing_to_remove_under_removal_perplexity():
    model = make_identity(make_tiny_model("qwen2"), 2)
    scores = score_layers(model, BLOCKS, "removal_perplexity", options())
    with torch.no_grad():
        loss, tokens = token_loss_sum(model, BLOCKS)
    assert float(scores[2]) == pytest.approx(float(torch.exp(loss / tokens)), rel=1e-4)


def test_contiguous_with_block_of_one_equals_block_influence():
    model = make_tiny_model("mistral")
    assert torch.allclose(score_layers(model, BLOCKS, "contiguous", options(block_size=1)), score_layers(model, BLOCKS, "bi", options()))


def test_magnitude_is_the_sum_of_absolute_projection_weights():
    model = make_tiny_model("opt")
    layer = Anatomy(model).layers[1]
    expected = sum(float(linear.weight.abs().sum()) for linear in Anatomy(model).linears(layer).values())
    assert float(score_layers(model, None, "magnitude", options())[1]) == pytest.approx(expected, rel=1e-5)


def test_taylor_matches_a_plain_backward_of_the_mean_loss():
    model = make_tiny_model("llama")
    scores = score_layers(model, BLOCKS, "taylor", options())
    loss, tokens = token_loss_sum(model, BLOCKS)
    (loss / tokens).backward()
    linears = Anatomy(model).linears(Anatomy(model).layers[2]).values()
    expected = sum(float((linear.weight * linear.weight.grad).abs().sum()) for linear in linears)
    assert float(scores[2]) == pytest.approx(expected, rel=1e-4)


def test_gradient_is_the_mean_over_samples_of_summed_gradient_norms():
    model = make_tiny_model("qwen3")
    scores = score_layers(model, BLOCKS[:2], "gradient", options(batch_size=1))
    layer = Anatomy(model).layers[4]
    per_sample = []
    for row in BLOCKS[:2]:
        loss, tokens = token_loss_sum(model, row[None])
        grads = torch.autograd.grad(loss / tokens, list(layer.parameters()))
        per_sample.append(sum(float(g.norm()) for g in grads))
    assert float(scores[4]) == pytest.approx(sum(per_sample) / 2, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_score_does_not_depend_on_batch_size():
    model = make_tiny_model("llama")
    one = score_layers(model, BLOCKS[:4], "gradient", options(batch_size=1))
    four = score_layers(model, BLOCKS[:4], "gradient", options(batch_size=4))
    torch.testing.assert_close(one, four, rtol=1e-5, atol=0)
    # the norm of the batch's mean gradient (one "sample" of 4 blocks) is smaller: norms are not additive
    layer = Anatomy(model).layers[2]
    loss, tokens = token_loss_sum(model, BLOCKS[:4])
    pooled = sum(float(g.norm()) for g in torch.autograd.grad(loss / tokens, list(layer.parameters())))
    assert pooled < 0.95 * float(four[2])


def test_random_is_seeded():
    model = make_tiny_model("llama")
    assert torch.equal(score_layers(model, None, "random", options(seed=1)), score_layers(model, None, "random", options(seed=1)))
    assert not torch.equal(score_layers(model, None, "random", options(seed=1)), score_layers(model, None, "random", options(seed=2)))


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding", "opt"])
def test_prefix_reuse_scores_and_picks_equal_the_naive_path(family):
    model = make_tiny_model(family)
    candidates = [2, 3, 4]
    fast = score_layers(model, BLOCKS, "removal_perplexity", options(candidates=candidates))
    naive = score_layers(model, BLOCKS, "removal_perplexity", options(candidates=candidates, prefix_reuse=False))
    assert torch.isnan(fast[[0, 1, 5]]).all()
    assert torch.allclose(fast[candidates], naive[candidates], rtol=1e-4)
    picks = [
        prune_layers(
            make_tiny_model(family), BLOCKS, metric="ppl", selection="iterative", num_layers=3, options=options(prefix_reuse=reuse)
        )["removed_layers"]
        for reuse in (True, False)
    ]
    assert picks[0] == picks[1]


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(InputError, match="block_influence.*removal_perplexity"):
        get_metric("cosine")


def test_block_metrics_refuse_non_block_data():
    with pytest.raises(InputError, match="token blocks"):
        score_layers(make_tiny_model("llama"), [1, 2, 3], "bi", options())


@pytest.mark.slow
def test_smollm2_prefix_reuse_picks_equal_naive():
    """SmolLM2 (30 layers), 2×32 tokens: removal-perplexity scores and picks with and without prefix reuse."""
    from lightning_prune.data.text import load_blocks
    from lightning_prune.model.loading import load_model

    model, tokenizer = load_model("demo")
    blocks = load_blocks(tokenizer, "wikitext2", split="validation", seq_len=32, num_samples=2, seed=0)
    candidates = list(range(1, 29))
    fast = score_layers(model, blocks, "removal_perplexity", options(candidates=candidates))
    naive = score_layers(model, blocks, "removal_perplexity", options(candidates=candidates, prefix_reuse=False))
    assert torch.allclose(fast[1:29], naive[1:29], rtol=1e-4)
    protected = protected_positions(30)
    assert one_shot(fast, 7, protected) == one_shot(naive, 7, protected)
