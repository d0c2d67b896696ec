"""Both CoMe recipes run under ``fit`` on the real SmolLM2 demo model with a tiny budget."""

import json
from pathlib import Path

import pytest
from conftest import read_decision

from lightning_prune.cli import main


def come_args(name: str, run_dir: Path, model: str = "demo", num_layers: int = 2) -> list[str]:
    """``fit --config come_sp|come_mp`` with the merge stage unchanged and every size shrunk."""
    args = [
        "fit",
        "--config",
        name,
        "--run_dir",
        str(run_dir),
        "--model.init_args.model",
        model,
        "--merge.num_layers",
        str(num_layers),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.val_check_interval",
        "1",
        "--data.init_args.seq_len",
        "32",
        "--data.init_args.num_train_samples",
        "4",
        "--data.init_args.calibration_samples",
        "2",
        "--evaluation.data",
        "wikitext2",
        "--evaluation.seq_len",
        "32",
        "--evaluation.num_samples",
        "2",
    ]
    if name == "come_sp":
        args += ["--trainer.max_steps", "1"]
    else:
        args += ["--trainer.check_val_every_n_epoch", "1"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("name", ["come_sp", "come_mp"])
def test_recipe_fits_on_smollm2(name, tmp_path):
    main(come_args(name, tmp_path))
    groups = read_decision(tmp_path, "merge")["groups"]
    assert len(groups) == 28 and sum(len(group) for group in groups) == 30
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 28
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dense"]["num_layers"] == 30
    assert metrics["after merge"]["num_layers"] == metrics["after training"]["num_layers"] == 28
