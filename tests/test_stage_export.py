"""StageCallback's export: model card, compressed-tensors export and push_to_hub at the end of fit."""

import json

import lightning as L
import pytest
import torch
import yaml
from conftest import make_tiny_model, random_ids
from fake_hub import fake_hub
from torch.utils.data import DataLoader

from lightning_prune.callbacks import StageCallback
from lightning_prune.errors import InputError
from lightning_prune.sparsity.compressed import load_compressed
from lightning_prune.stages import PruneStage, SparsifyStage


@pytest.fixture
def hub(monkeypatch):
    yield from fake_hub(monkeypatch)


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_tiny_model("llama").train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=1e-3)


class Blocks(L.LightningDataModule):
    def calibration_blocks(self):
        return random_ids(4, 16, seed=1)

    def train_dataloader(self):
        return DataLoader(list(random_ids(4, 16, seed=2)), batch_size=2)


def fit(tmp_path, callback) -> TinyModule:
    module = TinyModule()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=Blocks())
    return module


def test_fit_saves_a_card_and_pushes_model_dir(hub, tmp_path):
    (tmp_path / "config.yaml").write_text("stages: [prune]\nprune:\n  layers: [1]\n")
    fit(tmp_path, StageCallback([PruneStage(layers=[1])], source="demo", push_to_hub="me/tiny"))
    card = (tmp_path / "model" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["tags"] == ["lightning-prune", "pruned"]
    assert "prune: remove layers [1]" in card
    assert "| decoder layers | 5 |" in card  # no evaluation: the saved model's sizes
    assert "# lightning-prune fit --config config.yaml\nstages: [prune]" in card
    assert [c["path"] for c in hub.commits] == ["/api/models/me/tiny/commit/main"]
    assert hub.commits[0]["files"] == {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}


def test_fit_exports_compressed_tensors(tmp_path):
    stage = SparsifyStage(method="magnitude", allocation="uniform", structure="2:4", export_format="compressed")
    module = fit(tmp_path, StageCallback([stage]))
    sparsity = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask"
    ids = random_ids()
    reloaded = load_compressed(tmp_path / "model")
    reloaded.config._attn_implementation = module.model.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model.eval()(ids).logits)


def test_push_to_hub_without_credentials_is_refused_at_construction(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(InputError, match="needs Hub credentials"):
        StageCallback([PruneStage(layers=[1])], push_to_hub="me/tiny")
    with pytest.raises(InputError, match="needs save_model true and dry_run false"):
        StageCallback([PruneStage(layers=[1])], dry_run=True, push_to_hub="me/tiny")
