"""The shipped healing recipes run end to end on a tiny model through the CLI (sizes shrunk, stages unchanged)."""

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main
from lightning_prune.sparsity import measure_sparsity

TINY = [
    "--trainer.max_steps",
    "2",
    "--trainer.val_check_interval",
    "2",
    "--trainer.accumulate_grad_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.seq_len",
    "32",
    "--data.init_args.num_train_samples",
    "8",
    "--data.init_args.num_val_samples",
    "2",
    "--data.init_args.calibration_samples",
    "4",
    "--model.init_args.learning_rate",
    "1e-2",
    "--evaluation.seq_len",
    "32",
    "--evaluation.num_samples",
    "2",
    "--evaluation.tasks",
    "arc_easy",
    "--evaluation.limit",
    "3",
]
# recipe -> (its stage's metrics.json label, the stage's size flag, layers after the stage)
RECIPES = {
    "prune_heal": ("after prune", ["--prune.num_layers", "2"], 4),
    "random_baseline": ("after prune", ["--prune.num_layers", "2"], 4),
    "sparse_heal": ("after sparsify", [], 6),
}


def run_recipe(name: str, model_dir: Path, out: Path) -> dict:
    stage_flags = RECIPES[name][1]
    main(["fit", "--config", name, "--run_dir", str(out), "--model.init_args.model", str(model_dir), *stage_flags, *TINY])
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_changes_heals_evaluates_and_saves(name, tiny_dir, tmp_path):
    out = tmp_path / "run"
    metrics = run_recipe(name, tiny_dir, out)
    label, _, depth = RECIPES[name]
    assert {"dense", label, "after training", "settings", "versions"} <= set(metrics)
    assert metrics["dense"]["num_layers"] == 6
    assert metrics[label]["num_layers"] == metrics["after training"]["num_layers"] == depth
    for entry in ("dense", label, "after training"):
        assert set(metrics[entry]["perplexity"]) == {"wikitext2", "c4"}
        assert {"num_parameters", "num_bytes"} <= set(metrics[entry])
        assert metrics[entry]["tasks"]["arc_easy"]["num_items"] == 3
    assert metrics["after training"]["perplexity"] != metrics[label]["perplexity"]  # healing changed the model
    if depth < 6:
        assert metrics[label]["num_parameters"] < metrics["dense"]["num_parameters"]
    assert metrics["settings"]["evaluation"]["limit"] == 3 and metrics["settings"]["evaluation"]["harness"]["limit"] == 3
    assert [stage["name"] for stage in metrics["settings"]["stages"]] == [label.split()[-1]]

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run_dir"] == str(out) and config["model"]["init_args"]["model"] == str(tiny_dir)
    assert config["stages"] == [label.split()[-1]]
    decisions = json.loads((out / "decisions.json").read_text())
    assert [entry["kind"] for entry in decisions["decisions"]] == [label.split()[-1]]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == depth
    assert not hasattr(reloaded, "peft_config")  # the adapters are merged in
    if name == "sparse_heal":
        assert abs(measure_sparsity(reloaded)["overall"] - 0.5) < 1e-3  # the merged LoRA delta was re-masked
    else:
        assert len(decisions["decisions"][0]["removed_layers"]) == 2
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    logged = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    keys = {key for row in logged for key, value in row.items() if value}
    tag = label.replace(" ", "_")
    assert {
        "eval/dense/perplexity_wikitext2",
        f"eval/{tag}/perplexity_c4",
        "eval/after_training/perplexity_c4",
        "eval/after_training/arc_easy_acc_norm",
        "train_loss",
        "val_perplexity",
    } <= keys
    ids = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()


def test_a_teacher_recipe_fit_warns_nothing_about_its_frozen_teacher(tiny_dir, tmp_path):
    """The teacher sits in eval mode on purpose: Lightning's eval-mode warning is not shown to the user."""
    flags = ["--prune.num_layers", "2", "--evaluate", "false", *TINY[:-4]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            ["fit", "--config", "prune_distill_heal", "--run_dir", str(tmp_path / "run"), "--model.init_args.model", str(tiny_dir), *flags]
        )
    assert (tmp_path / "run" / "model").is_dir()
    assert not [w for w in caught if "in eval mode" in str(w.message)], [str(w.message) for w in caught]
