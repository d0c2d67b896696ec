"""``lightning-prune sparsify``: outputs on a tiny model; bad input is one line, exit 2, nothing written."""

import json

import pytest
import torch
from conftest import read_decision
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main

SMALL = ["--calibration_data", "wikitext2", "--calibration_samples", "4", "--seq_len", "32", "--eval_samples", "4"]


def test_sparsify_writes_model_decisions_metrics_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(
        [
            "sparsify",
            "--model",
            str(tiny_dir),
            "--method",
            "wanda",
            "--allocation",
            "dlp",
            "--sparsity",
            "0.7",
            "--alpha",
            "0.1",
            *SMALL,
            "--output_dir",
            str(out),
        ]
    )
    capsys.readouterr()
    decisions = read_decision(out, "sparsify")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(decisions["layer_sparsity"]) == 6
    assert sum(decisions["layer_sparsity"]) / 6 == pytest.approx(0.7)
    assert metrics["measured_sparsity"]["overall"] == pytest.approx(0.7, abs=1e-3)
    assert metrics["after"]["perplexity"]["wikitext2"] > 0 and metrics["before"]["perplexity"]["wikitext2"] > 0
    assert (out / "layer_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    weights = [m.weight for name, m in reloaded.named_modules() if name.endswith("proj")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.7, abs=1e-3)
    assert torch.count_nonzero(reloaded.lm_head.weight) == reloaded.lm_head.weight.numel()


def test_sparsify_mixed_nm(tiny_dir, tmp_path, capsys):
    out = tmp_path / "nm"
    main(
        [
            "sparsify",
            "--model",
            str(tiny_dir),
            "--method",
            "magnitude",
            "--allocation",
            "dlp",
            "--structure",
            "2:4",
            "--alpha",
            "0.2",
            *SMALL,
            "--output_dir",
            str(out),
        ]
    )
    capsys.readouterr()
    decisions = read_decision(out, "sparsify")
    assert decisions["settings"]["sparsity"] == 0.5
    assert sum(int(p.split(":")[0]) for p in decisions["layer_patterns"]) == 2 * 6


@pytest.mark.parametrize(
    "options",
    [
        ["--sparsity", "1.0"],
        ["--sparsity", "-0.2"],
        ["--alpha", "0.0"],
        ["--alpha", "0.7"],
        ["--sparsity", "0.1", "--alpha", "0.15"],
        ["--structure", "4:4"],
        ["--structure", "2:3"],
        ["--structure", "2:4", "--sparsity", "0.7"],
        ["--structure", "1:4", "--allocation", "dlp", "--alpha", "0.2"],
        ["--method", "obs"],
        ["--allocation", "global"],
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tiny_dir, tmp_path, capsys, options):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(["sparsify", "--model", str(tiny_dir), *SMALL, "--output_dir", str(out), *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lightning-prune: error:") and "\n" not in error
    assert not out.exists()
