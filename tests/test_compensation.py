"""Compensation: folded weights equal the run-time operation; refusals where folding is not exact."""

import pytest
import torch
from conftest import make_tiny_model, random_ids
from transformers import AutoModelForCausalLM, OPTConfig

from lightning_prune.compensation import make_compensation
from lightning_prune.compensation.magnitude import fold_residual_scale, magnitude_gain
from lightning_prune.compensation.projection import (
    ProjectionCompensation,
    fold_projection,
    learn_projection,
    reconstruction_data,
    ridge_projection,
    solve_projection,
)
from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import remove_layers
from lightning_prune.pruning import prune_layers

IDS = random_ids(2, 16, seed=7)
BLOCKS = random_ids(6, 24, seed=3)
OPTIONS = ScoringOptions(progress=False, batch_size=3)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def zero_norm_eps(model) -> None:
    """Norm eps = 0 makes norm(αh) = norm(h) exact, so only float rounding remains."""
    for module in model.modules():
        for name in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def scaled_input(position: int, alpha: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * alpha, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * alpha}

    return position, hook


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2_sliding", "qwen3", "opt"])
def test_folded_magnitude_scale_equals_runtime_scale(family):
    reference, folded = make_tiny_model(family), make_tiny_model(family)
    for model in (reference, folded):
        zero_norm_eps(model)
        remove_layers(model, [3])
    position, hook = scaled_input(3, 1.37)
    handle = Anatomy(reference).layers[position].register_forward_pre_hook(hook, with_kwargs=True)
    expected = logits(reference)
    handle.remove()
    fold_residual_scale(folded, 3, 1.37)
    assert torch.allclose(logits(folded), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(reference), expected, atol=1e-2)
    anatomy, tied = Anatomy(folded), family == "llama_tied"
    assert (anatomy.lm_head.weight is anatomy.embed_tokens.weight) == tied == folded.config.tie_word_embeddings


def test_tied_fold_keeps_weights_tied_and_moves_the_scale_into_the_final_norm():
    reference, folded = make_tiny_model("llama_tied"), make_tiny_model("llama_tied")
    for model in (reference, folded):
        zero_norm_eps(model)
    position, hook = scaled_input(2, 1.37)
    handle = Anatomy(reference).layers[position].register_forward_pre_hook(hook, with_kwargs=True)
    expected = logits(reference)
    handle.remove()
    fold_residual_scale(folded, 2, 1.37)
    torch.testing.assert_close(logits(folded), expected, atol=1e-5, rtol=1e-5)
    anatomy, original = Anatomy(folded), Anatomy(reference)
    assert anatomy.lm_head.weight is anatomy.embed_tokens.weight
    torch.testing.assert_close(anatomy.embed_tokens.weight, original.embed_tokens.weight * 1.37)
    torch.testing.assert_close(anatomy.final_norm.weight, original.final_norm.weight / 1.37)


def test_tied_final_layer_norm_bias_is_scaled_too():
    config = OPTConfig(
        vocab_size=256,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        tie_word_embeddings=True,
        dropout=0.0,
    )
    reference, folded = (AutoModelForCausalLM.from_config(config).eval() for _ in range(2))
    with torch.no_grad():
        Anatomy(reference).final_norm.bias.normal_(0, 0.5)
    folded.load_state_dict(reference.state_dict())
    for model in (reference, folded):
        zero_norm_eps(model)
    position, hook = scaled_input(2, 0.7)
    handle = Anatomy(reference).layers[position].register_forward_pre_hook(hook, with_kwargs=True)
    expected = logits(reference)
    handle.remove()
    fold_residual_scale(folded, 2, 0.7)
    assert Anatomy(folded).lm_head.weight is Anatomy(folded).embed_tokens.weight
    torch.testing.assert_close(logits(folded), expected, atol=1e-5, rtol=1e-5)


def test_tied_model_without_a_final_norm_weight_is_untied():
    model = make_tiny_model("llama_tied")
    anatomy = Anatomy(model)
    del anatomy.final_norm.weight  # a norm without learned weight cannot absorb 1/alpha
    anatomy.final_norm.weight = None
    fold_residual_scale(model, 2, 1.5)
    assert anatomy.lm_head.weight is not anatomy.embed_tokens.weight and not model.config.tie_word_embeddings


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors counted once


def safetensors_bytes(model, path) -> int:
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_magnitude_pruned_tied_model_stays_tied_and_smaller_than_dense(tmp_path):
    dense, model = make_tiny_model("llama_tied"), make_tiny_model("llama_tied")
    decisions = prune_layers(model, BLOCKS, layers=[2, 3], compensation="magnitude", options=OPTIONS)
    anatomy = Anatomy(model)
    assert anatomy.lm_head.weight is anatomy.embed_tokens.weight and model.config.tie_word_embeddings
    assert decisions["untied_embeddings"] is False
    assert parameter_count(model) < parameter_count(dense)
    assert safetensors_bytes(model, tmp_path / "pruned") < safetensors_bytes(dense, tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert Anatomy(reloaded).lm_head.weight is Anatomy(reloaded).embed_tokens.weight
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)


def test_folding_with_real_norm_eps_is_close():
    reference, folded = make_tiny_model("llama"), make_tiny_model("llama")
    position, hook = scaled_input(2, 1.2)
    handle = Anatomy(reference).layers[position].register_forward_pre_hook(hook, with_kwargs=True)
    expected = logits(reference)
    handle.remove()
    fold_residual_scale(folded, 2, 1.2)
    assert torch.allclose(logits(folded), expected, atol=1e-3, rtol=1e-3)


def test_identity_layer_has_unit_magnitude_gain():
    model = make_tiny_model("qwen2")
    anatomy = Anatomy(model)
    with torch.no_grad():
        anatomy.part(anatomy.layers[2], "o_proj").weight.zero_()
        anatomy.part(anatomy.layers[2], "down_proj").weight.zero_()
    assert magnitude_gain(model, BLOCKS, 2, OPTIONS) == pytest.approx(1.0, abs=1e-6)
    assert magnitude_gain(model, BLOCKS, 3, OPTIONS) > 1.0


def test_magnitude_compensation_scales_what_enters_the_gap():
    model = make_tiny_model("llama")
    decisions = prune_layers(model, BLOCKS, layers=[3], compensation="magnitude", options=OPTIONS)
    alpha = decisions["compensation_steps"][0]["alpha"]
    reference = make_tiny_model("llama")
    assert alpha == pytest.approx(magnitude_gain(reference, BLOCKS, 3, OPTIONS))
    assert torch.allclose(Anatomy(model).embed_tokens.weight, Anatomy(reference).embed_tokens.weight * alpha)


def test_post_norm_opt_is_refused_before_any_change():
    config = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, do_layer_norm_before=False)
    model = AutoModelForCausalLM.from_config(config)
    for name in ("magnitude", "projection"):
        with pytest.raises(InputError, match="post-norm"):
            prune_layers(model, BLOCKS, metric="bi", num_layers=1, compensation=name, options=OPTIONS)
        assert Anatomy(model).num_layers == 4


def test_unknown_compensation_lists_the_valid_ones():
    with pytest.raises(InputError, match="none, magnitude, projection"):
        make_compensation("affine")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_folded_projection_equals_runtime_projection(family):
    reference, folded = make_tiny_model(family), make_tiny_model(family)
    projection = torch.eye(64) + 0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    down = Anatomy(reference).part(Anatomy(reference).layers[2], "down_proj")
    bias = down.bias if down.bias is not None else 0.0
    handle = down.register_forward_hook(lambda module, args, output: (output - bias) @ projection.T + bias)
    expected = logits(reference)
    handle.remove()
    fold_projection(folded, 2, projection)
    assert torch.allclose(logits(folded), expected, atol=1e-5, rtol=1e-4)


def test_projection_compensates_the_max_drift_layer_and_lowers_its_reconstruction_loss():
    original = make_tiny_model("llama")
    model = make_tiny_model("llama")
    decisions = prune_layers(model, BLOCKS, layers=[2, 3], compensation="projection", options=OPTIONS)
    final = decisions["compensation_final"]
    kept = decisions["kept_layers"]
    assert kept == [0, 1, 4, 5]
    assert final["layer"] == kept[max(range(len(kept)), key=final["drift"].__getitem__)]
    assert final["loss_after"] < 0.9 * final["loss_before"]
    assert final["solver"] == "closed_form" and str(final["reg"]) in final["heldout_mse"]  # the default solver
    position = kept.index(final["layer"])
    y, r = reconstruction_data(original, model, BLOCKS, position, final["layer"], OPTIONS)
    assert float(torch.nn.functional.mse_loss(y, r)) == pytest.approx(final["loss_after"], rel=1e-3)


def ridge_problem(tokens: int = 256, dim: int = 16, seed: int = 0):
    """Y (tokens, dim) and R = Y Aᵀ + noise for a map A near I."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens, dim, generator=generator) * torch.linspace(0.2, 2.0, dim)
    target = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=generator)
    return y, y @ target.T + 0.1 * torch.randn(tokens, dim, generator=generator)


def projection_objective(weight, y, r, reg):
    """learn_projection's objective: mean((Y W'ᵀ − R)²) + reg‖W' − I‖²_F."""
    return torch.nn.functional.mse_loss(y @ weight.T, r) + reg * (weight - torch.eye(len(weight), dtype=weight.dtype)).pow(2).sum()


@pytest.mark.parametrize("reg", [1e-3, 1e-1])
def test_closed_form_projection_is_the_gradient_descent_optimum(reg):
    y, r = ridge_problem()
    closed = ridge_projection(y, r, reg)
    weight = torch.nn.Parameter(torch.eye(16, dtype=torch.float64))
    optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = projection_objective(weight, y.double(), r.double(), reg)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    torch.testing.assert_close(closed, weight.detach(), atol=1e-4, rtol=0)
    gradient = torch.func.grad(lambda w: projection_objective(w, y.double(), r.double(), reg))(closed)
    assert float(gradient.abs().max()) < 1e-10


def test_solve_projection_picks_the_heldout_best_reg_and_beats_adam():
    y, r = ridge_problem(tokens=96)
    weight, before, after, reg, errors = solve_projection(y, r, reg_grid=(1e-4, 1e-2, 10.0))
    assert reg == min(errors, key=errors.get) and set(errors) == {1e-4, 1e-2, 10.0}
    assert errors[10.0] > errors[reg]  # λ = 10 pins W' to I
    torch.testing.assert_close(weight, ridge_projection(y, r, reg).float())
    adam, _, adam_after = learn_projection(y, r, steps=200)
    assert after < adam_after < before
    assert after == pytest.approx(float(projection_objective(weight, y, r, 0.0)), rel=1e-5)


def test_closed_form_refuses_fewer_tokens_than_the_hidden_size():
    y, r = ridge_problem(tokens=10)
    with pytest.raises(InputError, match="10 calibration tokens for a 16x16 map; give at least 16 tokens"):
        ridge_projection(y, r, 1e-3)
    model = make_tiny_model("llama")
    with pytest.raises(InputError, match="32 calibration tokens for a 64x64 map"):
        prune_layers(model, random_ids(2, 16), layers=[2, 3], compensation="projection", options=OPTIONS)
    assert Anatomy(model).num_layers == 6


def test_adam_solver_is_kept_and_unknown_solvers_are_refused():
    model = make_tiny_model("llama")
    compensation = ProjectionCompensation(steps=50, solver="adam")
    compensation.start(model, BLOCKS, OPTIONS)
    remove_layers(model, [3])
    final = compensation.finish(model, BLOCKS, [0, 1, 2, 4, 5], OPTIONS)
    assert final["solver"] == "adam" and final["reg"] == 1e-3 and final["loss_after"] < final["loss_before"]
    with pytest.raises(InputError, match="choose one of closed_form, adam"):
        ProjectionCompensation(solver="lbfgs")


def test_make_compensation_passes_settings_and_names_unknown_ones():
    assert make_compensation("projection", solver="adam").solver == "adam"
    assert make_compensation("projection").solver == "closed_form"
    with pytest.raises(InputError, match="compensation 'magnitude' has no option 'solver'; its options: none"):
        make_compensation("magnitude", solver="adam")


def test_prune_stage_passes_its_projection_solver_and_replays_the_fit():
    from lightning_prune.stages import PruneStage

    blocks = random_ids(8, 16)  # 128 tokens >= the tiny hidden size (64)
    decisions = {}
    for solver in ("closed_form", "adam"):
        model = make_tiny_model("llama")
        stage = PruneStage(layers=[3], compensation="projection", projection_solver=solver)
        decisions[solver] = stage.plan(model, blocks, progress=False)
        assert decisions[solver].record["compensation_final"]["solver"] == solver
        replayed = make_tiny_model("llama")
        decisions[solver].apply(replayed)
        ids = random_ids(1, 8)
        torch.testing.assert_close(replayed(input_ids=ids).logits, model(input_ids=ids).logits)
    first, second = (decisions[s].tensors()["projection.down_proj"] for s in ("closed_form", "adam"))
    assert not torch.equal(first, second)
