"""SBI importance (004 Eq. 1'): window influences agree with CoMe's statistics; redundant stretches score low."""

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions, score_layers
from lightning_prune.importance.sbi import layer_scores_from_windows
from lightning_prune.merging.statistics import calibration_statistics
from lightning_prune.model.anatomy import Anatomy

BLOCKS = random_ids(6, 24, seed=3)


def options(**kwargs) -> ScoringOptions:
    return ScoringOptions(**{"progress": False, "batch_size": 3, **kwargs})


def test_layer_score_is_the_mean_of_the_windows_containing_it():
    window = torch.tensor([0.1, 0.3, 0.5, 0.2])  # 5 layers, two-layer windows
    torch.testing.assert_close(layer_scores_from_windows(window, 1), torch.tensor([0.1, 0.2, 0.4, 0.35, 0.2]))
    three = layer_scores_from_windows(torch.tensor([0.3, 0.6, 0.9]), 2)  # 5 layers, three-layer windows
    torch.testing.assert_close(three, torch.tensor([0.3, 0.45, 0.6, 0.75, 0.9]))


def test_sbi_windows_equal_comes_calibration_statistics():
    model = make_tiny_model("llama")
    window = calibration_statistics(model, torch.split(BLOCKS, 3), progress=False).window_influence
    expected = layer_scores_from_windows(window, 1)
    torch.testing.assert_close(score_layers(model, BLOCKS, "sbi", options()), expected, rtol=1e-4, atol=1e-5)


def test_a_redundant_pair_of_layers_scores_lowest():
    model = make_tiny_model("qwen2")
    anatomy = Anatomy(model)
    with torch.no_grad():
        for position in (2, 3):  # both layers return their input: SBI_{2;3} = 0
            for role in ("o_proj", "down_proj"):
                anatomy.part(anatomy.layers[position], role).weight.zero_()
    scores = score_layers(model, BLOCKS, "sbi", options())
    assert set(scores.argsort()[:2].tolist()) == {2, 3}
    assert float(scores[2]) < float(scores[[0, 1, 4, 5]].min())


def test_window_size_is_validated():
    with pytest.raises(InputError, match="block_size=6 .* must be in 1..5"):
        score_layers(make_tiny_model("llama"), BLOCKS, "sbi", options(block_size=6))
