"""Distillation losses: zero on equal states, validated names, and who a massive dimension blinds."""

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.errors import InputError
from lightning_prune.merging.distill import DISTILLATION_LOSSES, distillation_loss, hidden_kl, layer_outputs
from lightning_prune.model.anatomy import Anatomy

DIM, MASSIVE = 64, 5


def massive_state(seed: int = 0, massive: float = 10.0) -> torch.Tensor:
    """(2, 8, 64) states of scale 0.01 with one dimension at ``massive`` (1000x the others).

    At 10.0 the raw softmax puts ~0.997 of its mass on that dimension, as SmolLM2's
    massive-activation dimension does (~0.999).
    """
    hidden = 0.01 * torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(seed))
    hidden[..., MASSIVE] = massive
    return hidden


def final_norm() -> torch.nn.Module:
    """A final RMSNorm whose learned weight damps the massive dimension, as trained models' do."""
    norm = torch.nn.RMSNorm(DIM, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[MASSIVE] = 1e-3
    return norm.requires_grad_(False)


def prediction_gradient(name: str, target: torch.Tensor) -> torch.Tensor:
    """∂loss/∂prediction at prediction = target + small noise on every dimension."""
    noise = 1e-3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    prediction = (target + noise).requires_grad_(True)
    (gradient,) = torch.autograd.grad(distillation_loss(name, target, prediction, norm=final_norm()), prediction)
    return gradient


def top_dimension_share(gradient: torch.Tensor, target: torch.Tensor) -> float:
    """‖gradient on the largest-magnitude dimension‖ / ‖gradient‖."""
    top = int(target.abs().mean(dim=(0, 1)).argmax())
    return float(gradient[..., top].norm() / gradient.norm())


@pytest.mark.parametrize("name", list(DISTILLATION_LOSSES))
def test_each_loss_is_zero_when_prediction_equals_target(name):
    target = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(0))
    assert abs(float(distillation_loss(name, target, target.clone(), norm=final_norm()))) < 1e-6
    other = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1))
    assert float(distillation_loss(name, target, other, norm=final_norm())) > 1e-3


def test_kl_raw_is_the_papers_hidden_kl():
    target, prediction = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(distillation_loss("kl_raw", target, prediction), hidden_kl(target, prediction))


def test_mse_norm_and_kl_norm_match_their_definitions():
    target, prediction = torch.randn(2, 5, DIM), torch.randn(2, 5, DIM)

    def unit(h):
        return h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    torch.testing.assert_close(distillation_loss("mse_norm", target, prediction), (unit(target) - unit(prediction)).pow(2).mean())
    norm = final_norm()
    with torch.no_grad():
        expected = hidden_kl(norm(target), norm(prediction))
    torch.testing.assert_close(distillation_loss("kl_norm", target, prediction, norm=norm), expected)
    cos = torch.nn.functional.cosine_similarity(target, prediction, dim=-1)
    torch.testing.assert_close(distillation_loss("cosine", target, prediction), (1 - cos).mean())


def test_temperature_softens_kl_and_is_validated():
    target, prediction = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    hot = distillation_loss("kl_raw", target, prediction, temperature=2.0)
    torch.testing.assert_close(hot, 4 * hidden_kl(target / 2, prediction / 2))
    with pytest.raises(InputError, match="temperature 0.0 must be > 0"):
        distillation_loss("kl_raw", target, prediction, temperature=0.0)
    with pytest.raises(InputError, match="applies to kl_raw and kl_norm only"):
        distillation_loss("mse_norm", target, prediction, temperature=2.0)


def test_unknown_loss_and_missing_norm_are_refused():
    target = torch.randn(1, 2, 8)
    with pytest.raises(InputError, match="kl_raw, kl_norm, mse_norm, cosine"):
        distillation_loss("kl", target, target)
    with pytest.raises(InputError, match="final norm"):
        distillation_loss("kl_norm", target, target)


def test_default_loss_gradient_is_not_dominated_by_the_massive_dimension():
    target = massive_state()
    assert float(target.softmax(-1)[..., MASSIVE].mean()) > 0.99
    assert top_dimension_share(prediction_gradient("mse_norm", target), target) < 0.5
    assert top_dimension_share(prediction_gradient("kl_norm", target), target) < 0.5
    assert top_dimension_share(prediction_gradient("cosine", target), target) < 0.5


def test_kl_raw_gradient_goes_to_the_massive_dimension_and_starves_the_rest():
    target = massive_state()
    gradient = prediction_gradient("kl_raw", target)
    assert top_dimension_share(gradient, target) > 0.9
    without_massive = massive_state(massive=0.01)

    def rest(g):
        return torch.cat([g[..., :MASSIVE], g[..., MASSIVE + 1 :]], dim=-1).norm()

    assert float(rest(gradient)) < 0.01 * float(rest(prediction_gradient("kl_raw", without_massive)))


def test_kl_norm_uses_the_models_final_norm_on_real_layer_outputs():
    model = make_tiny_model("llama")
    ids = random_ids()
    with torch.no_grad():
        hidden = layer_outputs(model, ids, [5])[5]
        logits = model(input_ids=ids, use_cache=False).logits
    norm = Anatomy(model).final_norm
    torch.testing.assert_close(Anatomy(model).lm_head(norm(hidden)), logits)
    assert float(distillation_loss("kl_norm", hidden, hidden + 0.1, norm=norm)) > 0
