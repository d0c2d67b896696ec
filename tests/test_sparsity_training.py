"""Masks survive training (full fine-tuning through StageCallback, checkpoints, LoRA and its merge)."""

import lightning as L
import torch
from conftest import make_tiny_model, random_ids
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.sparsity import measure_sparsity, prunable_linears
from lightning_prune.stages import SparsifyStage, SparsityDecision
from lightning_prune.stages.plan import checkpoint_decisions, read_plan


class RandomTrainData(TextDataModule):
    """WikiText-2 calibration blocks of the tiny tokenizer; random token blocks to train on."""

    def train_dataloader(self):
        return DataLoader(random_ids(24, 32), batch_size=4)


def _data(tiny_dir):
    return RandomTrainData(tokenizer=str(tiny_dir), seq_len=32, calibration_samples=4, num_train_samples=4)


def _trainer(max_steps, callback, tmp_path):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )


def _assert_masked(model, masks):
    for name, linear in prunable_linears(model):
        assert (linear.weight[~masks[name]] == 0).all(), name


def test_callback_keeps_zeros_through_training_and_resume(tiny_dir, tmp_path):
    module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-2, weight_decay=0.1)
    callback = StageCallback([SparsifyStage(method="wanda", allocation="dlp", sparsity=0.6, alpha=0.1)], run_dir=str(tmp_path / "run"))
    trainer = _trainer(4, callback, tmp_path)
    trainer.fit(module, datamodule=_data(tiny_dir))
    model = module.model
    (decision,) = callback.decisions
    assert isinstance(decision, SparsityDecision)
    masks = decision.masks
    assert set(masks) == {name for name, _ in prunable_linears(model)}
    _assert_masked(model, masks)  # AdamW weight decay and the updates did not revive a pruned weight
    assert abs(measure_sparsity(model)["overall"] - 0.6) < 1e-3
    reference = make_tiny_model("llama")
    kept = masks["layers.0.q_proj"]
    assert not torch.allclose(
        model.model.layers[0].self_attn.q_proj.weight[kept], reference.model.layers[0].self_attn.q_proj.weight[kept]
    )  # it did train
    plan, _ = read_plan(tmp_path / "run")
    assert all(torch.equal(plan[0].masks[k], masks[k]) for k in masks)  # decisions.json + decisions.safetensors
    _assert_masked(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model"), masks)  # the saved model too
    path = tmp_path / "sparse.ckpt"
    trainer.save_checkpoint(path)
    (stored,) = checkpoint_decisions(torch.load(path, weights_only=True))
    assert stored.record["layer_sparsity"] == decision.record["layer_sparsity"]
    assert all(torch.equal(stored.masks[k], masks[k]) for k in masks)

    # different settings on purpose: the checkpoint's masks and weights must win
    resumed_module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-2, weight_decay=0.1)
    resumed = StageCallback(
        [SparsifyStage(method="magnitude", allocation="uniform", sparsity=0.3)], run_dir=str(tmp_path / "resumed"), resume_from=str(path)
    )
    _trainer(8, resumed, tmp_path).fit(resumed_module, datamodule=_data(tiny_dir), ckpt_path=path)
    assert resumed_module.trainer.global_step == 8
    (restored,) = resumed.decisions
    assert all(torch.equal(restored.masks[k], masks[k]) for k in masks)
    _assert_masked(resumed_module.model, masks)
    assert abs(measure_sparsity(resumed_module.model)["overall"] - 0.6) < 1e-3
    assert restored.record["settings"]["allocation"] == "dlp" and restored.record["settings"]["method"] == "wanda"


def test_lora_training_and_merge_keep_masks():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    decision = SparsifyStage(method="sparsegpt", allocation="owl", sparsity=0.5).plan(peft_model, random_ids(2, 16), progress=False)
    masks = decision.masks
    base = {name: linear.weight.detach().clone() for name, linear in prunable_linears(peft_model)}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(5):
        ids = random_ids(2, 16, seed=step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        decision.mask_gradients(peft_model)  # the frozen base has no gradient: nothing to mask
        optimizer.step()
        optimizer.zero_grad()
        decision.constrain(peft_model)
    _assert_masked(peft_model, masks)  # base weights are frozen
    merged = peft_model.merge_and_unload()
    assert any((linear.weight[~masks[name]] != 0).any() for name, linear in prunable_linears(merged))
    decision.on_export(merged)
    _assert_masked(merged, masks)
    assert abs(measure_sparsity(merged)["overall"] - 0.5) < 1e-3
    changed = [not torch.equal(linear.weight, base[name]) for name, linear in prunable_linears(merged)]
    assert any(changed)  # the adapters' updates were folded into the kept weights


def test_sparse_lora_healing_saves_a_remasked_merge(tiny_dir, tmp_path):
    """HealingModule + SparsifyStage through fit: the saved merge has exactly the masks' zeros."""
    from lightning_prune.modules.healing import HealingModule

    module = HealingModule(
        model=str(tiny_dir),
        lora_dropout=0.0,
        learning_rate=1e-2,
        warmup_steps=0,
        target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
    )
    callback = StageCallback([SparsifyStage(method="wanda", allocation="uniform", sparsity=0.5)], run_dir=str(tmp_path / "run"))
    _trainer(3, callback, tmp_path).fit(module, datamodule=_data(tiny_dir))
    masks = callback.decisions[0].masks
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n), "adapters did not train"
    _assert_masked(module.model, masks)  # the frozen base keeps its zeros
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    _assert_masked(saved, masks)
    assert abs(measure_sparsity(saved)["overall"] - 0.5) < 1e-3
    reference = make_tiny_model("llama")
    kept = masks["layers.0.gate_proj"]
    assert not torch.allclose(
        saved.model.layers[0].mlp.gate_proj.weight[kept], reference.model.layers[0].mlp.gate_proj.weight[kept]
    )  # the LoRA delta was merged
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
