"""Masks survive training (full fine-tuning with the callback, checkpoints, LoRA and its merge)."""

import lightning as L
import torch
from conftest import make_tiny_model, random_ids
from torch.utils.data import DataLoader

from lightning_prune.callbacks.sparsify import SparsifyCallback, remask_merged
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.sparsity import measure_sparsity, prunable_linears, sparsify


def _trainer(max_steps, callback, tmp_path):
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )


def _assert_masked(model, masks):
    for name, linear in prunable_linears(model):
        assert (linear.weight[~masks[name]] == 0).all(), name


def test_callback_keeps_zeros_through_training_and_resume(tiny_dir, tmp_path):
    module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-2, weight_decay=0.1)
    callback = SparsifyCallback(method="wanda", allocation="dlp", sparsity=0.6, alpha=0.1,
                                data="wikitext2", calibration_samples=4, seq_len=32)
    data = DataLoader(random_ids(24, 32), batch_size=4)
    trainer = _trainer(4, callback, tmp_path)
    trainer.fit(module, data)
    model = module.model
    masks = callback.masks
    _assert_masked(model, masks)
    assert abs(measure_sparsity(model)["overall"] - 0.6) < 1e-3
    reference = make_tiny_model("llama")
    kept = masks["layers.0.q_proj"]
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight[kept],
                              reference.model.layers[0].self_attn.q_proj.weight[kept])  # it did train
    path = tmp_path / "sparse.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=False)["sparsify"]
    assert stored["decisions"]["layer_sparsity"] == callback.decisions["layer_sparsity"]

    # different settings on purpose: the checkpoint's masks and weights must win
    resumed_module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-2, weight_decay=0.1)
    resumed = SparsifyCallback(method="magnitude", allocation="uniform", sparsity=0.3,
                               data="wikitext2", calibration_samples=4, seq_len=32)
    _trainer(8, resumed, tmp_path).fit(resumed_module, data, ckpt_path=path)
    assert all(torch.equal(resumed.masks[k], masks[k]) for k in masks)
    _assert_masked(resumed_module.model, masks)
    assert abs(measure_sparsity(resumed_module.model)["overall"] - 0.6) < 1e-3
    assert resumed.decisions["allocation"] == "dlp"


def test_lora_training_and_merge_keep_masks():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    result = sparsify(peft_model, random_ids(2, 16), method="sparsegpt", allocation="owl", sparsity=0.5, progress=False)
    base = {name: linear.weight.detach().clone() for name, linear in prunable_linears(peft_model)}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(5):
        ids = random_ids(2, 16, seed=step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _assert_masked(peft_model, result.masks)  # base weights are frozen
    merged = peft_model.merge_and_unload()
    assert any((linear.weight[~result.masks[name]] != 0).any() for name, linear in prunable_linears(merged))
    remask_merged(merged, result.masks)
    _assert_masked(merged, result.masks)
    assert abs(measure_sparsity(merged)["overall"] - 0.5) < 1e-3
    changed = [not torch.equal(linear.weight, base[name]) for name, linear in prunable_linears(merged)]
    assert any(changed)  # the adapters' updates were folded into the kept weights
