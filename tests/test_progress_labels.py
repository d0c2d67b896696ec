"""Progress bars say where a long run is: "removal 2/3 · scoring 4 layers", "removal 2/3 · removing layer 4"."""

import torch
from conftest import make_tiny_model, random_ids

from lightning_prune import pruning
from lightning_prune.importance import ScoringOptions


def test_iterative_pruning_labels_every_scoring_and_removal(monkeypatch):
    labels = []

    def recording_metric(model, data, options):
        labels.append(options.label)
        return torch.arange(model.config.num_hidden_layers, dtype=torch.float)

    monkeypatch.setitem(pruning.METRICS, "magnitude", recording_metric)
    removals = []
    original_remove = pruning._Run.remove

    def remove(self, index):
        original_remove(self, index)
        removals.append(self.options.label)

    monkeypatch.setattr(pruning._Run, "remove", remove)
    model = make_tiny_model("llama")
    pruning.prune_layers(
        model,
        random_ids(2, 8),
        metric="magnitude",
        selection="iterative",
        num_layers=3,
        protect=(0, 0),
        options=ScoringOptions(progress=False),
    )
    assert labels == ["removal 1/3 · scoring 6 layers", "removal 2/3 · scoring 5 layers", "removal 3/3 · scoring 4 layers"]
    assert [label.split(" · ")[0] for label in removals] == ["removal 1/3", "removal 2/3", "removal 3/3"]
    assert all(" · removing layer " in label for label in removals)


def test_bar_prefixes_the_label():
    assert ScoringOptions().bar("cosine") == "cosine"
    assert ScoringOptions(label="removal 1/2").bar("cosine") == "removal 1/2 · cosine"
