"""CLI: score, relevance and prune with a metric; bad input is one line, exit 2, nothing written."""

import json
import shutil

import pytest
from conftest import read_decision
from test_cli import assert_one_line_error, run_cli
from transformers import AutoModelForCausalLM, OPTConfig

COMMON = ["--seq_len", 32, "--calibration_samples", 4, "--batch_size", 4]


def test_score_writes_scores_and_plot(capsys, tiny_dir, tmp_path):
    code, out, err = run_cli(capsys, "score", "--model", tiny_dir, "--metric", "bi", *COMMON, "--output_dir", tmp_path / "s")
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert record["metric"] == "block_influence" and len(record["scores"]) == 6
    assert (tmp_path / "s" / "scores.png").stat().st_size > 1000


def test_prune_with_metric_selection_and_compensation(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "p"
    code, out, err = run_cli(
        capsys,
        "prune",
        "--model",
        tiny_dir,
        "--metric",
        "ppl",
        "--selection",
        "iterative",
        "--num_layers",
        2,
        "--compensation",
        "magnitude",
        *COMMON,
        "--eval_samples",
        4,
        "--output_dir",
        out_dir,
    )
    assert code == 0, err
    decisions = read_decision(out_dir, "prune")
    assert len(decisions["removed_layers"]) == 2 and len(decisions["steps"]) == 2
    first, second = decisions["steps"]
    assert first["removed"] == [decisions["removed_layers"][0]]
    assert min((v, int(k)) for k, v in first["scores"].items() if v is not None)[1] == first["removed"][0]
    assert str(first["removed"][0]) not in second["scores"] and second["scores"]["0"] is None
    assert all(step["alpha"] > 0 for step in decisions["compensation_steps"])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["before"]["num_layers"] == 6 and metrics["after"]["num_layers"] == 4
    assert AutoModelForCausalLM.from_pretrained(out_dir / "model").config.num_hidden_layers == 4


def test_relevance_writes_json_and_heatmap(capsys, tiny_dir, tmp_path):
    code, out, err = run_cli(
        capsys,
        "relevance",
        "--model",
        tiny_dir,
        "--tasks",
        "arc_easy,piqa",
        "--calibration_samples",
        6,
        "--seq_len",
        32,
        "--output_dir",
        tmp_path / "r",
    )
    assert code == 0, err
    record = json.loads((tmp_path / "r" / "relevance.json").read_text())
    assert set(record["tasks"]) == {"arc_easy", "piqa", "mixed"}
    assert record["tasks"]["mixed"]["items"] == 12
    for task in record["tasks"].values():
        assert len(task["block_influence"]) == 6 and len(task["accuracy_relevance"]) == 6
        assert task["chance"] in (pytest.approx(0.25), pytest.approx(0.5), pytest.approx(0.375))
    assert (tmp_path / "r" / "relevance.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["prune", "--metric", "cosine", "--num_layers", 1], "unknown metric 'cosine'; choose one of magnitude, taylor"),
        (["prune", "--selection", "greedy", "--num_layers", 1], "unknown selection 'greedy'; choose one of one_shot"),
        (["prune", "--compensation", "affine", "--num_layers", 1], "unknown compensation 'affine'; choose one of none"),
        (["prune", "--num_layers", 4], "num_layers=4 must be in 1..3"),
        (["prune", "--metric", "magnitude", "--num_layers", 1], "6 layers and 6 are protected, leaving none to remove"),
        (["prune", "--ratio", 1.5], "outside (0, 1)"),
        (["prune", "--ratio", 0.3, "--num_layers", 1], "exactly one of --layers, --num_layers or --ratio"),
        (["prune", "--layers", "1", "--num_layers", 1], "exactly one of"),
        (["prune"], "exactly one of"),
        (["score", "--metric", "nope"], "unknown metric 'nope'"),
        (["relevance", "--tasks", "nope.jsonl"], "task 'nope.jsonl' is neither a bundled task"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, tiny_dir, tmp_path, args, fragment):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, *args, "--model", tiny_dir, "--output_dir", out_dir)
    assert_one_line_error(code, err, fragment)
    assert not out_dir.exists()


def test_bad_task_file_and_post_norm_compensation_are_refused(capsys, tiny_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"query": "q", "choices": [], "gold": 0}) + "\n")
    code, _, err = run_cli(capsys, "relevance", "--model", tiny_dir, "--tasks", task, "--output_dir", tmp_path / "a")
    assert_one_line_error(code, err, "empty or non-text 'choices'")
    opt_dir = tmp_path / "opt"
    config = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, do_layer_norm_before=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(opt_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, opt_dir)
    code, _, err = run_cli(
        capsys, "prune", "--model", opt_dir, "--num_layers", 1, "--compensation", "magnitude", "--output_dir", tmp_path / "b"
    )
    assert_one_line_error(code, err, "not exact for post-norm blocks")
    assert not (tmp_path / "b").exists()
