"""An optional feature whose extra is missing fails in one line naming the install command, before any work."""

import subprocess
import sys

import pytest
from conftest import assert_one_line_error, run_cli

from lightning_prune.errors import InputError
from lightning_prune.extras import missing_extra, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(InputError) as error:
        require("lm_eval", "--tasks (lm-eval accuracy)")
    assert (
        str(error.value)
        == "--tasks (lm-eval accuracy) needs the optional package lm_eval; install it with: pip install 'lightning-prune[eval]'"
    )
    require("peft", "LoRA")  # installed here: no error


def test_missing_extra_finds_the_module_behind_a_wrapped_error():
    try:
        try:
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
        except ModuleNotFoundError as inner:
            raise ValueError("class_path could not be resolved") from inner
    except ValueError as outer:
        assert "pip install 'lightning-prune[lora]'" in missing_extra(outer)
    assert missing_extra(ModuleNotFoundError("No module named 'numpyy'", name="numpyy")) is None


def test_evaluate_tasks_without_lm_eval_fails_before_loading(capsys, monkeypatch, tiny_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run_cli(capsys, "evaluate", "--model", tiny_dir, "--tasks", "piqa", "--output_dir", tmp_path / "e")
    assert_one_line_error(code, err, "pip install 'lightning-prune[eval]'")
    assert not (tmp_path / "e").exists()


def test_demo_without_peft_fails_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)
    code, _, err = run_cli(capsys, "demo", "--output_dir", tmp_path / "demo")
    assert_one_line_error(code, err, "pip install 'lightning-prune[lora]'")
    assert not (tmp_path / "demo").exists()


def test_a_lora_recipe_without_peft_is_one_line(tmp_path):
    script = (
        "import sys; sys.modules['peft'] = None; from lightning_prune.cli import main; "
        f"main(['fit', '--config', 'prune_heal', '--run_dir', {str(tmp_path / 'run')!r}])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lightning-prune: error:")]
    assert len(lines) == 1 and "pip install 'lightning-prune[lora]'" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
