"""One option vocabulary across commands, bare yes/no flags, and the console summary vs ``--json``."""

import json

import pytest
from conftest import run_cli

from lightning_prune.cli import bare_flags, renamed_options
from lightning_prune.summary import markdown_table, model_rows

EVAL = ["--seq_len", 32, "--eval_samples", 2]


@pytest.mark.parametrize(
    "argv, expanded",
    [
        (["--overwrite"], ["--overwrite", "true"]),
        (["--overwrite", "--seq_len", "32"], ["--overwrite", "true", "--seq_len", "32"]),
        (["--overwrite", "false"], ["--overwrite", "false"]),
        (["--seed", "-1", "--dry_run"], ["--seed", "-1", "--dry_run", "true"]),
        (["--model", "overwrite"], ["--model", "overwrite"]),
    ],
)
def test_bare_flags_mean_true(argv, expanded):
    assert bare_flags(argv, {"overwrite", "dry_run"}) == expanded


def test_old_names_map_to_the_current_ones_per_command(capsys):
    assert renamed_options("sparsify", ["--data", "c4"]) == ["--calibration_data", "c4"]
    assert renamed_options("prune", ["--data=c4", "--num_samples", "2"]) == ["--eval_data=c4", "--eval_samples", "2"]
    assert renamed_options("relevance", ["--num_items", "8"]) == ["--calibration_samples", "8"]
    assert renamed_options("score", ["--data", "c4"]) == ["--data", "c4"]
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 4 and all(line.startswith("lightning-prune: note: ") for line in notes)
    assert "sparsify --data is now --calibration_data" in notes[0]


def test_old_names_still_run_with_one_note_each(capsys, tiny_dir, tmp_path):
    args = ["evaluate", "--model", tiny_dir, "--data", "wikitext2", "--num_samples", 2, "--seq_len", 32]
    code, out, err = run_cli(capsys, *args, "--output_dir", tmp_path / "run", "--json")
    assert code == 0, err
    assert [line for line in err.splitlines() if "note:" in line] == [
        "lightning-prune: note: evaluate --data is now --eval_data; the old name goes in the next release",
        "lightning-prune: note: evaluate --num_samples is now --eval_samples; the old name goes in the next release",
    ]
    settings = json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]
    assert settings["eval_data"] == "wikitext2" and settings["eval_samples"] == 2
    assert json.loads(out)["settings"] == settings


def test_bare_overwrite_replaces_results(capsys, tiny_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    code, _, err = run_cli(capsys, "evaluate", "--model", tiny_dir, *EVAL, "--output_dir", run, "--overwrite")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["num_layers"] == 6


def test_prune_prints_a_summary_table_not_json(capsys, tiny_dir, tmp_path):
    code, out, err = run_cli(capsys, "prune", "--model", tiny_dir, "--layers", "1,3", *EVAL, "--output_dir", tmp_path / "p")
    assert code == 0, err
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    lines = out.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    assert header == ["stage", "layers", "parameters", "weights MB", "PPL wikitext2", "seconds"]
    dense, pruned = (line.split("|")[1:-1] for line in lines[2:4])
    assert [cell.strip() for cell in dense[:3]] == ["dense", "6", f"{metrics['before']['num_parameters']:,}"]
    assert [cell.strip() for cell in pruned[:3]] == ["prune", "4", f"{metrics['after']['num_parameters']:,}"]
    assert pruned[4].strip() == f"{metrics['after']['perplexity']['wikitext2']:.2f}"
    assert any("remove" in line for line in lines[4:]) and lines[-1] == f"saved to {tmp_path / 'p'}/model"


def test_model_rows_leave_missing_values_empty():
    table = model_rows(
        {
            "a": {"num_layers": 2, "num_parameters": 1000, "num_bytes": 4e6, "perplexity": {"x": 3.14159}},
            "b": {"num_layers": 1, "num_parameters": 500, "num_bytes": 2e6, "tasks": {"piqa": {"acc_norm": 0.5}}},
        },
        {"b": 1.25},
    )
    header, _, first, second = (line.split("|")[1:-1] for line in table.splitlines())
    assert [cell.strip() for cell in header] == ["stage", "layers", "parameters", "weights MB", "PPL x", "acc piqa", "seconds"]
    assert [cell.strip() for cell in first] == ["a", "2", "1,000", "4.0", "3.14", "", ""]
    assert [cell.strip() for cell in second] == ["b", "1", "500", "2.0", "", "0.500", "1.2"]


def test_markdown_table_pads_columns():
    assert markdown_table(["a", "bb"], [["ccc", "d"]]).splitlines() == ["| a   | bb |", "|-----|----|", "| ccc | d  |"]
