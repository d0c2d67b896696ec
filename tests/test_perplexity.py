import math

import torch
from conftest import make_tiny_model

from lightning_prune.evaluation.perplexity import perplexity


def test_perplexity_equals_exp_of_hf_loss(tiny_model):
    blocks = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = tiny_model(input_ids=blocks, labels=blocks).loss
    value = perplexity(tiny_model, blocks, batch_size=3, progress=False)
    assert math.isclose(value, math.exp(loss.item()), rel_tol=1e-5)


def test_perplexity_restores_training_mode():
    model = make_tiny_model("llama").train()
    perplexity(model, torch.zeros(2, 8, dtype=torch.long), progress=False)
    assert model.training
