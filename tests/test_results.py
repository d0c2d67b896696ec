import json

import pytest
import torch
from conftest import make_tiny_model, random_ids
from transformers import AutoModelForCausalLM

from lightning_prune.callbacks import StageCallback
from lightning_prune.errors import InputError
from lightning_prune.results import RunDirectory, count_parameters, shard_size_bytes, weight_bytes


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


def test_a_small_shard_size_saves_several_shards_that_transformers_reloads(tmp_path):
    model = make_tiny_model("llama")  # 1.02 MB of fp32 weights, the largest matrix 64 kB
    path = RunDirectory(tmp_path).save_model(model, max_shard_size="200KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(shards) >= weight_bytes(model) // 200_000 and shards == sorted(set(index["weight_map"].values()))
    assert all(p.stat().st_size <= 200_000 + 10_000 for p in path.glob("*.safetensors"))  # + the header
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    for (key, value), original in zip(reloaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(value, original), key
    ids = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("size", "expected"), [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500 MB", 5 * 10**8), (1000, 1000), ("1.5KB", 1500)]
)
def test_shard_sizes_parse(size, expected):
    assert shard_size_bytes(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "-1GB", "0", "GB", ""])
def test_a_bad_shard_size_is_refused_before_any_work(size):
    with pytest.raises(InputError, match="is not a size; give bytes or a number with a unit"):
        StageCallback(max_shard_size=size)
