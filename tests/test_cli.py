import json
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, read_decision, run_cli
from transformers import GPT2Config, GPT2LMHeadModel


def test_evaluate_writes_metrics(capsys, tiny_dir, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a tiny model. " * 200)
    code, out, err = run_cli(
        capsys,
        "evaluate",
        "--model",
        tiny_dir,
        "--eval_data",
        f"wikitext2,{text}",
        "--seq_len",
        32,
        "--eval_samples",
        4,
        "--output_dir",
        tmp_path / "run",
        "--json",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["perplexity"]) == {"wikitext2", "story"}
    assert all(value > 1 for value in metrics["perplexity"].values())
    assert metrics["num_layers"] == 6
    assert metrics["settings"]["seq_len"] == 32 and metrics["settings"]["eval_samples"] == 4
    assert metrics["settings"]["data_files"]["wikitext2"] == "wikitext-2-raw/wiki.test.raw"
    assert "torch" in metrics["versions"] and "transformers" in metrics["versions"]
    assert json.loads(out)["perplexity"] == metrics["perplexity"]


def test_prune_saves_reloadable_model(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--layers", "3,1", "--seq_len", 32, "--eval_samples", 4, "--output_dir", out_dir
    )
    assert code == 0, err
    decision = read_decision(out_dir, "prune")
    assert decision["removed_layers"] == [3, 1] and decision["kept_layers"] == [0, 2, 4, 5]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["before"]["num_layers"] == 6 and metrics["after"]["num_layers"] == 4
    assert metrics["after"]["num_parameters"] < metrics["before"]["num_parameters"]
    assert (out_dir / "config.yaml").is_file()
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out_dir / 'model')!r}); t = AutoTokenizer.from_pretrained({str(out_dir / 'model')!r});"
        "ids = t('The game', return_tensors='pt').input_ids;"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=t.eos_token_id);"
        "assert 'lightning_prune' not in sys.modules; print(m.config.num_hidden_layers, out.shape[1] - ids.shape[1])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["4", "5"]


@pytest.fixture
def gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    return path


def bad_inputs(tiny_dir, gpt2_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    common = ["--seq_len", 32, "--eval_samples", 4]
    return [
        (["evaluate", "--model", tmp_path / "nope"], "does not exist"),
        (["evaluate", "--model", gpt2_dir], "unsupported architecture 'gpt2'; supported model types: llama"),
        (["prune", "--model", tiny_dir, "--layers", "6", *common], "out of range; the model has layers 0..5"),
        (["prune", "--model", tiny_dir, "--layers", "2,2", *common], "more than once"),
        (["prune", "--model", tiny_dir, "--layers", "0,1,2,3,4,5", *common], "cannot remove all 6 layers"),
        (["prune", "--model", tiny_dir, "--layers", "a", *common], "comma-separated integers"),
        (["evaluate", "--model", tiny_dir, "--seq_len", 0], "seq_len must be a positive"),
        (["evaluate", "--model", tiny_dir, "--seq_len", 1000], "exceeds the model's maximum of 256"),
        (["evaluate", "--model", tiny_dir, "--seq_len", 200, "--eval_samples", 100000], "eval_samples=100000 is more than"),
        (["evaluate", "--model", tiny_dir, "--eval_data", empty, *common], "is empty"),
        (["evaluate", "--model", tiny_dir, "--eval_data", tmp_path / "missing.txt", *common], "does not exist"),
        (["evaluate", "--model", tiny_dir, "--dtype", "float8", *common], "dtype 'float8' is not supported"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(capsys, tiny_dir, gpt2_dir, tmp_path):
    for args, fragment in bad_inputs(tiny_dir, gpt2_dir, tmp_path):
        out_dir = tmp_path / "out"
        code, _, err = run_cli(capsys, *args, "--output_dir", out_dir)
        assert_one_line_error(code, err, fragment)
        assert not out_dir.exists(), args


def test_existing_results_need_overwrite(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text("{}")
    code, _, err = run_cli(capsys, "evaluate", "--model", tiny_dir, "--seq_len", 32, "--eval_samples", 2, "--output_dir", out_dir)
    assert_one_line_error(code, err, "already holds results")
    assert (out_dir / "metrics.json").read_text() == "{}"
    code, _, err = run_cli(
        capsys, "evaluate", "--model", tiny_dir, "--seq_len", 32, "--eval_samples", 2, "--output_dir", out_dir, "--overwrite", "true"
    )
    assert code == 0, err


def test_console_script_error_is_exactly_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_prune.cli", "prune", "--model", str(tmp_path / "missing"), "--layers", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lightning-prune: error: model path")


def test_parser_errors_are_one_line(capsys):
    code, _, err = run_cli(capsys, "evaluate", "--seq_len", "many")
    assert_one_line_error(code, err, "seq_len")


def test_data_problems_are_named_before_any_weights_load(capsys, tiny_dir, tmp_path, monkeypatch):
    import lightning_prune.commands.common as common

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the data was checked")

    monkeypatch.setattr(common, "load_model", no_weights)
    missing, folder = tmp_path / "missing.txt", tmp_path / "folder"
    folder.mkdir()
    cases = [
        (["evaluate", "--eval_data", f"wikitext2,{missing}"], "does not exist"),
        (["prune", "--layers", "1", "--eval_data", folder], "is a directory"),
        (["prune", "--metric", "bi", "--num_layers", "1", "--calibration_data", missing], "does not exist"),
        (["score", "--metric", "bi", "--calibration_data", missing], "does not exist"),
        (["merge", "--num_layers", "1", "--calibration_data", missing], "does not exist"),
        (["sparsify", "--sparsity", "0.5", "--calibration_data", missing], "does not exist"),
    ]
    for args, fragment in cases:
        out_dir = tmp_path / "out"
        code, _, err = run_cli(capsys, *args, "--model", tiny_dir, "--seq_len", 32, "--output_dir", out_dir)
        assert_one_line_error(code, err, fragment)
        assert not out_dir.exists(), args


def test_demo_runs_the_prune_heal_recipe_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    from conftest import make_tiny_model
    from test_slow_demo import check_demo

    layer = sum(p.numel() for p in make_tiny_model("llama").model.layers[0].parameters())
    check_demo(tmp_path, capsys, model=str(tiny_dir), depth=6, layer_parameters=layer)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--device", "foo"], "--device 'foo' is not a device"),
        (["--device", "cuda:7"], "--device 'cuda:7' is not available here"),
        (["--dtype", "int8"], "--dtype 'int8' is not supported; choose auto or one of float32"),
    ],
)
def test_bad_device_and_dtype_are_one_line_before_weights_load(capsys, tiny_dir, tmp_path, options, fragment):
    code, _, err = run_cli(capsys, "evaluate", "--model", tiny_dir, *options, "--output_dir", tmp_path / "e")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "e").exists()


def test_auto_device_and_dtype_resolve_to_what_this_machine_runs():
    import torch

    from lightning_prune.model.loading import resolve_device, resolve_dtype

    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"


def test_recipes_lists_and_copies_a_recipe_that_runs_from_its_copy(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0 and out.splitlines()[0].startswith("come_mp") and "prune_heal" in out
    code, out, err = run_cli(capsys, "recipes", "copy", "prune_heal", tmp_path / "mine")
    assert code == 0, err
    copied = tmp_path / "mine" / "prune_heal.yaml"
    assert copied.is_file() and (tmp_path / "mine" / "pieces" / "lora.yaml").is_file()
    from lightning_prune.lightning_cli import PruneCLI

    cli = PruneCLI(args=["--config", str(copied), "--run_dir", str(tmp_path / "run")], run=False)
    assert [stage.name for stage in cli.stage_callback.stages] == ["prune"]
    code, _, err = run_cli(capsys, "recipes", "copy", "prune_heal", tmp_path / "mine")
    assert_one_line_error(code, err, "would replace")
    code, _, err = run_cli(capsys, "recipes", "copy", "prune_hea", tmp_path / "other")
    assert_one_line_error(code, err, "did you mean 'prune_heal'?")
