"""The embedded SmolLM2-135M: loading, evaluation, pruning and the demo (prune_heal recipe) through the CLI (slow)."""

import json
import math
import subprocess
import sys

import pytest

from lightning_prune.cli import main
from lightning_prune.model import Anatomy, load_model

pytestmark = pytest.mark.slow


def test_demo_loads_as_30_layer_llama():
    model, tokenizer = load_model("demo")
    anatomy = Anatomy(model)
    assert (anatomy.family, anatomy.num_layers, anatomy.hidden_size) == ("llama", 30, 576)
    assert (anatomy.num_heads, anatomy.num_kv_heads) == (9, 3)
    assert anatomy.lm_head.weight is anatomy.embed_tokens.weight
    assert tokenizer("Hello world", add_special_tokens=False).input_ids


def test_evaluate_and_prune_demo(tmp_path, capsys):
    main(
        [
            "evaluate",
            "--model",
            "demo",
            "--eval_data",
            "wikitext2",
            "--seq_len",
            "128",
            "--eval_samples",
            "16",
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    dense = json.loads((tmp_path / "eval" / "metrics.json").read_text())["perplexity"]["wikitext2"]
    assert math.isfinite(dense) and 20 < dense < 200
    out_dir = tmp_path / "pruned"
    main(["prune", "--model", "demo", "--layers", "24,25", "--seq_len", "64", "--eval_samples", "4", "--output_dir", str(out_dir)])
    capsys.readouterr()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["after"]["num_layers"] == 28
    assert metrics["before"]["num_parameters"] - metrics["after"]["num_parameters"] == 2 * 3_540_096
    script = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"p = {str(out_dir / 'model')!r}; m = AutoModelForCausalLM.from_pretrained(p); t = AutoTokenizer.from_pretrained(p);"
        "ids = t('The capital of France is', return_tensors='pt').input_ids;"
        "out = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True);"
        "print(m.config.num_hidden_layers, out.shape[1] - ids.shape[1])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["28", "6"]


def check_demo(tmp_path, capsys, model: str = "demo", depth: int = 30, layer_parameters: int = 3_540_096) -> dict:
    """``lightning-prune demo`` (the prune_heal recipe through the CLI) with 2 layers removed and 1 healing step."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.cli import main

    out = tmp_path / "demo"
    main(["demo", "--model", model, "--num_layers", "2", "--heal_steps", "1", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    stages = {label: values for label, values in metrics.items() if isinstance(values, dict) and "perplexity" in values}
    assert list(stages) == ["dense", "after prune", "after training"]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in printed.splitlines() if line.startswith("|")]
    assert rows[0] == ["stage", "layers", "parameters", "weights MB", "PPL wikitext2", "PPL c4", "seconds"]
    for row, (label, values) in zip(rows[2:], stages.items(), strict=True):
        assert row[:3] == [label, str(values["num_layers"]), f"{values['num_parameters']:,}"]
        assert row[4] == f"{values['perplexity']['wikitext2']:.2f}"
        assert all(math.isfinite(v) and v > 1 for v in values["perplexity"].values())
    assert printed.splitlines()[-1] == f"healed model saved to {out}/model"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dense"]["num_layers"] == depth
    assert metrics["after prune"]["num_layers"] == metrics["after training"]["num_layers"] == depth - 2
    assert metrics["dense"]["num_parameters"] - metrics["after training"]["num_parameters"] == 2 * layer_parameters
    assert "seconds" in metrics["after prune"]
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == depth - 2
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "decisions.json").is_file()
    return metrics


def test_demo_command_prunes_heals_and_prints_the_table(tmp_path, capsys):
    check_demo(tmp_path, capsys)
