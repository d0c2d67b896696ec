"""The shipped healing recipes run end to end on a tiny model (sizes shrunk, stages unchanged)."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def tiny_recipe(name: str, model_dir: Path, out: Path) -> Path:
    """configs/<name>.yaml with the tiny model, 2 layers removed, 2 steps and short blocks."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer.update(max_steps=2, accumulate_grad_batches=1, val_check_interval=2, limit_val_batches=1, default_root_dir=str(out),
                   enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    pruning, evaluation, checkpoint = trainer["callbacks"]
    pruning["init_args"]["num_layers"] = 2
    evaluation["init_args"].update(seq_len=32, num_samples=2, tasks="arc_easy", limit=3)
    checkpoint["init_args"]["dirpath"] = str(out / "checkpoints")
    model.update(model=str(model_dir), save_dir=str(out), learning_rate=1e-2)
    data.update(tokenizer=str(model_dir), seq_len=32, num_train_samples=8, num_val_samples=2, calibration_samples=4, batch_size=2)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["prune_heal.yaml", "random_baseline.yaml"])
def test_recipe_prunes_heals_evaluates_and_saves(name, tiny_dir, tmp_path):
    out = tmp_path / "run"
    main(["fit", "--config", str(tiny_recipe(name, tiny_dir, out))])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["num_layers"] == metrics["after"]["num_layers"] == 4
    assert set(metrics["after"]["perplexity"]) == {"wikitext2", "c4"}
    assert metrics["after"]["tasks"]["arc_easy"]["num_items"] == 3 and metrics["settings"]["harness"]["limit"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 4
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    logged = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    keys = {key for row in logged for key, value in row.items() if value}
    assert {"eval/before/perplexity_wikitext2", "eval/after/perplexity_c4", "eval/after/arc_easy_acc_norm", "train_loss", "val_perplexity"} <= keys
    ids = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()

