import json

import pytest
from conftest import make_tiny_model

from lightning_prune.errors import InputError
from lightning_prune.results import RunDirectory, count_parameters


def test_run_directory_refuses_existing_results(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.check()
    run.write_json("metrics.json", {"a": 1})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"a": 1}
    with pytest.raises(InputError, match="already holds results"):
        RunDirectory(tmp_path / "run").check()
    RunDirectory(tmp_path / "run", overwrite=True).check()


def test_save_model_is_atomic(tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    run = RunDirectory(tmp_path)

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError):
        run.save_model(model)
    assert list(tmp_path.iterdir()) == []


def test_save_model_writes_safetensors(tmp_path):
    path = RunDirectory(tmp_path).save_model(make_tiny_model("qwen3"))
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_count_parameters_counts_tied_once():
    tied, untied = make_tiny_model("llama_tied"), make_tiny_model("llama")
    assert count_parameters(untied) - count_parameters(tied) == 256 * 64
