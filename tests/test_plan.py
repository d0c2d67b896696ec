"""Plans: ``--dry_run`` previews a decision and writes only ``decisions.json``; ``apply`` replays it exactly."""

import json

import pytest
import torch
from conftest import assert_one_line_error, make_tiny_model, random_ids, run_cli
from transformers import AutoModelForCausalLM

SMALL = ["--seq_len", 32, "--calibration_samples", 4, "--batch_size", 4]
COMMANDS = {
    "prune": ["prune", "--num_layers", 2, "--selection", "iterative", "--compensation", "magnitude", "--eval_samples", 2],
    "prune_projection": [
        "prune",
        "--num_layers",
        2,
        "--compensation",
        "projection",
        "--eval_samples",
        2,
        "--calibration_samples",
        4,
        "--seq_len",
        64,
    ],
    "merge": ["merge", "--num_layers", 2, "--eval_samples", 2],
    "sparsify": [
        "sparsify",
        "--method",
        "sparsegpt",
        "--allocation",
        "dlp",
        "--sparsity",
        0.6,
        "--calibration_data",
        "wikitext2",
        "--eval_samples",
        2,
    ],
}


def logits(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=random_ids(2, 16, seed=3)).logits


@pytest.mark.parametrize("name", list(COMMANDS))
def test_apply_replays_a_saved_plan_with_identical_logits(capsys, tiny_dir, tmp_path, name):
    run, replay = tmp_path / "run", tmp_path / "replay"
    code, _, err = run_cli(capsys, *COMMANDS[name][:1], "--model", tiny_dir, *SMALL, *COMMANDS[name][1:], "--output_dir", run)
    assert code == 0, err
    code, out, err = run_cli(capsys, "apply", "--plan", run / "decisions.json", "--model", tiny_dir, "--output_dir", replay)
    assert code == 0, err
    assert "| applied " in out and out.splitlines()[-1] == f"saved to {replay}/model"
    torch.testing.assert_close(logits(replay / "model"), logits(run / "model"), rtol=0, atol=1e-5)
    assert json.loads((replay / "decisions.json").read_text())["decisions"] == json.loads((run / "decisions.json").read_text())["decisions"]


def test_dry_run_prints_the_plan_and_writes_only_decisions(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "preview"
    code, out, err = run_cli(capsys, "prune", "--model", tiny_dir, *SMALL, "--num_layers", 2, "--output_dir", out_dir, "--dry_run", "true")
    assert code == 0, err
    assert "1. prune: remove layers" in out and "layers: 6 -> 4" in out and "safetensors bytes:" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["decisions.json"]
    code, _, err = run_cli(capsys, "apply", "--plan", out_dir, "--model", tiny_dir, "--output_dir", tmp_path / "applied")
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "applied" / "model").config.num_hidden_layers == 4


def test_recipe_dry_run_stops_before_training(capsys, tiny_dir, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "fit",
        "--config",
        "prune_heal",
        "--model.init_args.model",
        tiny_dir,
        "--prune.num_layers",
        2,
        "--data.init_args.seq_len",
        32,
        "--data.init_args.calibration_samples",
        4,
        "--evaluate",
        "false",
        "--run_dir",
        run,
        "--dry_run",
        "true",
        "--trainer.enable_progress_bar",
        "false",
    )
    assert code == 0, err
    assert "dry run: plan written to" in out and "layers: 6 -> 4" in out
    assert sorted(p.name for p in run.iterdir()) == ["decisions.json"]


def test_plan_for_another_model_or_corrupted_is_refused(capsys, tiny_dir, tmp_path, tiny_tokenizer):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, *SMALL, "--layers", "1,2", "--eval_samples", 2, "--output_dir", run)
    assert code == 0, err
    other = tmp_path / "qwen"
    make_tiny_model("qwen2").save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    code, _, err = run_cli(capsys, "apply", "--plan", run / "decisions.json", "--model", other, "--output_dir", tmp_path / "x")
    assert_one_line_error(code, err, "made for another model (model_type llama vs qwen2")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run_cli(capsys, "apply", "--plan", broken, "--model", tiny_dir, "--output_dir", tmp_path / "y")
    assert_one_line_error(code, err, "is not valid JSON")
    broken.write_text(json.dumps({"format": 1, "decisions": [{"kind": "rotate"}]}))
    code, _, err = run_cli(capsys, "apply", "--plan", broken, "--model", tiny_dir, "--output_dir", tmp_path / "y")
    assert_one_line_error(code, err, "kind 'rotate'; known kinds: prune, merge, sparsify")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dry_run_with_overwrite_is_refused(capsys, tiny_dir, tmp_path):
    code, _, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--num_layers", 1, "--dry_run", "true", "--overwrite", "true", "--output_dir", tmp_path / "z"
    )
    assert_one_line_error(code, err, "--dry_run writes only decisions.json")
