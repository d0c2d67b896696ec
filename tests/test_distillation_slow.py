"""Both CoMe recipes run under ``fit`` on the real SmolLM2 demo model with a tiny budget."""

import json
from pathlib import Path

import pytest
import yaml

from lightning_prune.cli import lightning_main

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["come_sp", "come_mp"])
def test_recipe_fits_on_smollm2(name, tmp_path):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    trainer, data = config["trainer"], config["data"]["init_args"]
    trainer.update(default_root_dir=str(tmp_path), logger=False, limit_val_batches=0, limit_train_batches=1)
    trainer.pop("val_check_interval", None)
    trainer.pop("check_val_every_n_epoch", None)
    if name == "come_sp":
        trainer["max_steps"] = 1
    trainer["callbacks"][0]["init_args"].update(output_dir=str(tmp_path), num_layers=2)
    config["model"]["init_args"]["save_dir"] = str(tmp_path)
    data.update(seq_len=32, num_train_samples=4, calibration_samples=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    lightning_main(["fit", "--config", str(path)])
    decisions = json.loads((tmp_path / "decisions.json").read_text())
    assert len(decisions["merge"]["groups"]) == 28
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 28
