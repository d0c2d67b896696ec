from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.lightning_cli import PruneCLI
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.modules.optim import warmup_cosine


def test_warmup_cosine_shape():
    values = [warmup_cosine(step, warmup_steps=2, total_steps=10) for step in range(11)]
    assert values[0] < values[1] < values[2] == 1.0
    assert values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_fit_trains_and_saves(tiny_dir, tmp_path):
    module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-3)
    data = TextDataModule(tokenizer=str(tiny_dir), seq_len=32, num_train_samples=8, num_val_samples=4, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=[StageCallback(run_dir=str(tmp_path / "saved"))],
    )
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=data)
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training changed no weight"
    assert trainer.callback_metrics["val_perplexity"] > 1
    assert (tmp_path / "saved" / "model" / "model.safetensors").is_file()


CONFIG_DIR = Path(__file__).parents[1] / "configs"
RECIPES = sorted(CONFIG_DIR.glob("*.yaml"))
PIECES = sorted((CONFIG_DIR / "pieces").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_every_recipe_parses_and_builds_its_stages(path):
    with open(path) as handle:
        recipe = yaml.safe_load(handle)
    cli = PruneCLI(args=["--config", str(path)], run=False)
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    assert [stage.name for stage in cli.stage_callback.stages] == recipe["stages"]
    assert cli.trainer.default_root_dir == recipe["run_dir"]
    assert cli.datamodule.hparams.tokenizer == cli.model.hparams.model  # linked


@pytest.mark.parametrize("path", PIECES, ids=lambda path: path.name)
def test_every_piece_is_valid_yaml_used_by_a_recipe(path):
    with open(path) as handle:
        assert yaml.safe_load(handle)
    assert any(f"pieces/{path.name}" in recipe.read_text() for recipe in RECIPES), f"{path.name} is used by no recipe"
