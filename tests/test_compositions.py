"""Every supported combination of stages runs through ``fit`` and saves exactly what the live model is.

Each composition runs on a tiny Llama: the saved ``run_dir/model`` is reloaded with plain
``transformers`` and checked (layer count, per-module sparsity equal to the live masks, logits
equal to the live exported model). Unsupported orders are refused before any weight loads.
"""

import json

import lightning as L
import pytest
import torch
from conftest import assert_one_line_error, random_ids, run_cli
from transformers import AutoModelForCausalLM

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.modules.distillation import LayerwiseDistillation
from lightning_prune.modules.healing import HealingModule
from lightning_prune.sparsity import prunable_linears
from lightning_prune.stages import MergeStage, PruneStage, SparsifyStage
from lightning_prune.stages.plan import check_stages

SPARSE = dict(method="wanda", allocation="uniform", sparsity=0.5)


def fit(model_dir, run_dir, module, stages):
    L.seed_everything(0)
    callback = StageCallback(stages, run_dir=str(run_dir))
    data = TextDataModule(tokenizer=str(model_dir), seq_len=32, num_train_samples=8, calibration_samples=4, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return callback


def assert_saved_equals_live(run_dir, callback, module, layers: int):
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    live = callback.export(module).eval()
    assert saved.config.num_hidden_layers == Anatomy(saved).num_layers == layers
    ids = random_ids(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, live(input_ids=ids).logits, rtol=0, atol=1e-5)
    return saved


def assert_exact_sparsity(saved, callback):
    masks = next(d for d in callback.decisions if d.kind == "sparsify").masks
    linears = dict(prunable_linears(saved))
    for name, mask in masks.items():
        weight = linears[name].weight
        assert torch.equal(weight != 0, mask), name  # zero exactly where the live mask prunes, nowhere else


def lora(model_dir, **options):
    return HealingModule(
        model=str(model_dir),
        lora_dropout=0.0,
        learning_rate=1e-2,
        warmup_steps=1,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        **options,
    )


def test_prune_then_heal(tiny_dir, tmp_path):
    module = lora(tiny_dir)
    callback = fit(tiny_dir, tmp_path, module, [PruneStage(num_layers=2, compensation="magnitude")])
    assert_saved_equals_live(tmp_path, callback, module, 4)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    plan = json.loads((tmp_path / "decisions.json").read_text())
    assert [d["kind"] for d in plan["decisions"]] == ["prune"] and len(plan["decisions"][0]["removed_layers"]) == 2


def test_sparsify_then_heal_saves_exactly_the_live_sparsity(tiny_dir, tmp_path):
    module = lora(tiny_dir)
    callback = fit(tiny_dir, tmp_path, module, [SparsifyStage(**SPARSE)])
    saved = assert_saved_equals_live(tmp_path, callback, module, 6)
    assert_exact_sparsity(saved, callback)
    merged_delta = module.export_model()  # without on_export the LoRA delta is dense
    assert any(
        bool((linear.weight != 0).sum() > mask.sum())
        for (name, linear), mask in zip(prunable_linears(merged_delta), callback.decisions[0].masks.values())
    )


def test_sparsify_then_qlora_heal(tiny_dir, tmp_path):
    module = lora(tiny_dir, quantize="nf4")
    callback = fit(tiny_dir, tmp_path, module, [SparsifyStage(**SPARSE)])
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert_exact_sparsity(saved, callback)


def test_prune_then_sparsify_then_heal(tiny_dir, tmp_path):
    module = lora(tiny_dir)
    callback = fit(tiny_dir, tmp_path, module, [PruneStage(num_layers=2), SparsifyStage(**SPARSE)])
    saved = assert_saved_equals_live(tmp_path, callback, module, 4)
    assert_exact_sparsity(saved, callback)
    assert [d.kind for d in callback.decisions] == ["prune", "sparsify"]


def test_merge_then_heal(tiny_dir, tmp_path):
    module = lora(tiny_dir)
    callback = fit(tiny_dir, tmp_path, module, [MergeStage(num_layers=2, batch_size=2)])
    assert_saved_equals_live(tmp_path, callback, module, 4)


def test_merge_then_distill_trains_only_the_merged_layers(tiny_dir, tmp_path):
    module = LayerwiseDistillation(model=str(tiny_dir), mode="sp", learning_rate=1e-2)
    callback = fit(tiny_dir, tmp_path, module, [MergeStage(num_layers=2, batch_size=2)])
    merge = callback.decisions[0]
    merged = set(merge.merged_positions())
    after_merge = merge.tensors()
    layers = Anatomy(module.model).layers
    for b, layer in enumerate(layers):
        state = {k: v for k, v in after_merge.items() if k.startswith(f"layers.{b}.")}
        if b in merged:
            assert any(not torch.equal(layer.state_dict()[k.split(".", 2)[2]], v) for k, v in state.items()), b
    assert_saved_equals_live(tmp_path, callback, module, 4)


def test_full_fine_tune_keeps_the_masks(tiny_dir, tmp_path):
    module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-2)
    callback = fit(tiny_dir, tmp_path, module, [SparsifyStage(**SPARSE)])
    saved = assert_saved_equals_live(tmp_path, callback, module, 6)
    assert_exact_sparsity(saved, callback)


@pytest.mark.parametrize(
    ("stages", "fragment"),
    [
        ([SparsifyStage(**SPARSE), PruneStage(num_layers=1)], "removes or merges layers after sparsify"),
        ([PruneStage(num_layers=1), PruneStage(num_layers=1)], "appears 2 times"),
        ([PruneStage(num_layers=3), MergeStage(num_layers=3)], "must be in 1..2"),
    ],
)
def test_unsupported_compositions_are_refused_up_front(stages, fragment):
    from conftest import make_tiny_model

    with pytest.raises(InputError, match=fragment):
        check_stages(stages, make_tiny_model("llama").config)


def test_recipe_with_a_bad_stage_order_is_one_line_before_any_weight_loads(capsys, tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    code, _, err = run_cli(
        capsys,
        "fit",
        "--config",
        "sparse_heal",
        "--model.init_args.model",
        tiny_dir,
        "--stages",
        "[sparsify, prune]",
        "--prune.num_layers",
        1,
        "--run_dir",
        tmp_path / "run",
    )
    assert_one_line_error(code, err, "put sparsify last")
    assert not (tmp_path / "run").exists()


def test_recipe_override_of_an_unknown_stage_option_lists_the_valid_ones(capsys, tmp_path):
    for typo in ("--prune.layer_count", "--prune.num_layer"):  # unknown, and a prefix (no abbreviations)
        code, _, err = run_cli(capsys, "fit", "--config", "prune_heal", typo, 3, "--run_dir", tmp_path / "run")
        assert_one_line_error(code, err, "valid prune options: batch_size, compensation, layers, metric")
        assert not (tmp_path / "run").exists()
