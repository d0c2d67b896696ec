"""``sparsify --export_format compressed``: compressed-tensors sparse bitmask files, lossless and smaller."""

import json
import sys

import pytest
import torch
from conftest import TINY_CONFIGS, assert_one_line_error, make_tiny_model, random_ids, run_cli
from transformers import AutoModelForCausalLM

from lightning_prune.model.loading import load_model
from lightning_prune.sparsity.compressed import load_compressed, save_compressed
from lightning_prune.sparsity.masks import prunable_linears

SMALL = ["--method", "magnitude", "--allocation", "uniform", "--seq_len", 32]


def sparsify(capsys, tiny_dir, out, *options):
    code, _, err = run_cli(capsys, "sparsify", "--model", tiny_dir, *SMALL, *options, "--output_dir", out)
    assert code == 0, err
    return out / "model"


@pytest.mark.parametrize(
    "options, fmt, structure",
    [(["--sparsity", "0.5"], "sparse-bitmask", "unstructured"), (["--structure", "2:4"], "sparse-24-bitmask", "2:4")],
)
def test_compressed_export_reloads_to_the_dense_logits_and_is_smaller(tiny_dir, tmp_path, capsys, options, fmt, structure):
    dense = sparsify(capsys, tiny_dir, tmp_path / "dense", *options)
    packed = sparsify(capsys, tiny_dir, tmp_path / "packed", *options, "--export_format", "compressed")
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    sparsity = config["sparsity_config"]
    assert (sparsity["format"], sparsity["sparsity_structure"]) == (fmt, structure)
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    assert sparsity["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    reference = AutoModelForCausalLM.from_pretrained(dense)
    reloaded = load_compressed(packed)
    ids = random_ids()
    assert torch.equal(reloaded(ids).logits, reference(ids).logits)
    loaded, _ = load_model(str(packed))  # every command's loader recognises the export
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    dense_bytes, packed_bytes = (dense / "model.safetensors").stat().st_size, (packed / "model.safetensors").stat().st_size
    assert packed_bytes < 0.85 * dense_bytes  # projections: half the values plus one bit per weight
    card = (packed / "README.md").read_text()
    assert "- compressed-tensors" in card and "load_compressed" in card
    assert "--export_format compressed" in card


def test_dense_export_has_no_compression_config(tiny_dir, tmp_path, capsys):
    dense = sparsify(capsys, tiny_dir, tmp_path / "dense", "--sparsity", "0.5")
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())


def test_missing_compressed_tensors_is_one_line_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "sparsify", "--model", tiny_dir, *SMALL, "--export_format", "compressed", "--output_dir", out)
    assert_one_line_error(code, err, "pip install 'lightning-prune[compressed]'")
    assert not out.exists()


def test_an_unknown_export_format_is_refused(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sparsify", "--model", tiny_dir, *SMALL, "--export_format", "gguf", "--output_dir", tmp_path / "r")
    assert_one_line_error(code, err, "export_format 'gguf' is not one of dense, compressed")


def test_apply_replays_a_compressed_plan_and_needs_the_package(tiny_dir, tmp_path, capsys, monkeypatch):
    plan = tmp_path / "plan"
    code, _, err = run_cli(
        capsys, "sparsify", "--model", tiny_dir, *SMALL, "--export_format", "compressed", "--output_dir", plan, "--dry_run", "true"
    )
    assert code == 0, err
    applied = tmp_path / "applied"
    code, _, err = run_cli(capsys, "apply", "--plan", plan / "decisions.json", "--model", tiny_dir, "--output_dir", applied)
    assert code == 0, err
    config = json.loads((applied / "model" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "apply", "--plan", plan / "decisions.json", "--model", tiny_dir, "--output_dir", again)
    assert_one_line_error(code, err, "pip install 'lightning-prune[compressed]'")
    assert not again.exists()


@pytest.mark.parametrize("family", TINY_CONFIGS)
def test_every_family_round_trips_exactly(family, tmp_path):
    model = make_tiny_model(family)
    with torch.no_grad():
        for _, linear in prunable_linears(model):
            linear.weight.mul_(linear.weight.abs() > 0.05)
    model.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    save_compressed(model, tmp_path)
    ids = random_ids()
    assert torch.equal(load_compressed(tmp_path)(ids).logits, reference(ids).logits)
