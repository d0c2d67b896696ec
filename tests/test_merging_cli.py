"""``lightning-prune merge`` on a tiny Llama, and its one-line errors (exit 2, nothing written)."""

import json

import pytest
import torch
from conftest import read_decision, run_cli
from transformers import AutoModelForCausalLM

SMALL = ("--seq_len", 16, "--eval_samples", 4, "--calibration_samples", 4, "--batch_size", 4)


def test_merge_writes_reloadable_model_and_decisions(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "merged"
    code, out, err = run_cli(capsys, "merge", "--model", tiny_dir, "--num_layers", 2, *SMALL, "--output_dir", out_dir, "--json")
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["before"]["num_layers"] == 6 and metrics["after"]["num_layers"] == 4
    assert metrics["after"]["perplexity"]["wikitext2"] > 1
    plan = json.loads((out_dir / "decisions.json").read_text())
    merge = read_decision(out_dir, "merge")
    assert plan["model"]["fingerprint"]["num_hidden_layers"] == 6 and len(merge["groups"]) == 4
    assert [m["teacher_last"] for m in merge["mapping"]] == [max(g) for g in merge["groups"] if len(g) > 1]
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir / "model")
    assert reloaded.config.num_hidden_layers == 4
    assert reloaded(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 256)
    assert json.loads(out)["after"] == metrics["after"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--num_layers", 6), "num_layers 6 (layers to merge away) must be in 1..5"),
        (("--num_layers", 0), "must be in 1..5"),
        (("--num_layers", 2, "--p", 0), "p 0.0 must be > 0"),
        (("--num_layers", 2, "--rho", 1), "rho 1.0 must be in [0, 1)"),
        (("--num_layers", 2, "--method", "laco"), "choose one of come, come_p, sum"),
        (("--num_layers", 2, "--norm_rule", "median"), "norm_rule 'median' is not known; choose one of mean, weighted, dominant"),
        (("--num_layers", 2, "--method", "sum", "--parts", "ffn"), "norm_rule and parts apply to come and come_p only"),
    ],
)
def test_merge_bad_input_is_one_line_and_writes_nothing(capsys, tiny_dir, tmp_path, options, fragment):
    out_dir = tmp_path / "never"
    code, out, err = run_cli(capsys, "merge", "--model", tiny_dir, *options, *SMALL, "--output_dir", out_dir)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lightning-prune: error:")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert not out_dir.exists()


def test_merge_refuses_unsupported_family(capsys, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    model_dir = tmp_path / "tiny-opt"
    make_tiny_model("opt").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    code, out, err = run_cli(capsys, "merge", "--model", model_dir, "--num_layers", 2, *SMALL, "--output_dir", tmp_path / "never")
    assert code == 2 and "supported: llama, mistral, qwen2, qwen3" in err
    assert not (tmp_path / "never").exists()
