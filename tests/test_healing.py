import importlib.util
import json

import lightning as L
import pytest
import torch
from conftest import make_tiny_model, random_ids
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.lora import PAPER_TARGETS, linear_module_names, merged_copy
from lightning_prune.modules.healing import HealingModule
from lightning_prune.modules.slim import SLIM_KEY

# tiny llama: 6 layers, hidden 64, intermediate 128; r x (in + out) per adapted projection
ADAPTER_PARAMETERS = 6 * 2 * ((64 + 128) + (64 + 128) + (128 + 64))


def healing_module(path, **kwargs) -> HealingModule:
    module = HealingModule(model=str(path), **kwargs)
    module.setup("fit")
    return module


def randomize_adapters(module: HealingModule, seed: int = 1) -> None:
    """LoRA B starts at zero (merge would be trivially exact); give it values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def fit(module, path, tmp_path, steps=3, run_dir=None, ckpt_path=None, **trainer_kwargs):
    """Fit on tiny WikiText-2 blocks; with ``run_dir`` a StageCallback (no stages) saves model/ and adapter/ there."""
    data = TextDataModule(tokenizer=str(path), seq_len=32, num_train_samples=8, num_val_samples=4, batch_size=4)
    callbacks = [StageCallback(run_dir=str(run_dir))] if run_dir is not None else []
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_paper_defaults():
    hp = HealingModule().hparams
    assert (hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.learning_rate, hp.warmup_steps) == (2, 2.0, 0.05, 3e-4, 100)
    assert tuple(hp.target_modules) == PAPER_TARGETS and hp.quantize is None


def test_only_adapter_parameters_train(tiny_dir):
    module = healing_module(tiny_dir)
    trainable = {name: p.numel() for name, p in module.model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == ADAPTER_PARAMETERS
    assert all("lora_" in name for name in trainable)
    assert len(trainable) == 6 * 3 * 2  # A and B for 3 projections in 6 layers
    module.setup("fit")  # idempotent: no second wrapping
    assert sum(p.numel() for p in module.model.parameters() if p.requires_grad) == ADAPTER_PARAMETERS


def test_merged_copy_equals_unmerged_adapters(tiny_dir):
    module = healing_module(tiny_dir)
    randomize_adapters(module)
    module.model.eval()
    ids = random_ids(2, 24)
    with torch.no_grad():
        adapted = module.model(input_ids=ids).logits
        merged = merged_copy(module.model)(input_ids=ids).logits
        base = module.model.get_base_model()
        with module.model.disable_adapter():
            plain = module.model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in merged_copy(module.model).named_parameters())
    assert isinstance(base.model.layers[0].mlp.gate_proj.base_layer, torch.nn.Linear)  # original untouched


def test_fit_saves_plain_model_and_adapter(tiny_dir, tmp_path):
    module = HealingModule(model=str(tiny_dir), learning_rate=1e-2, warmup_steps=0)
    fit(module, tiny_dir, tmp_path, run_dir=tmp_path / "run")
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n), "adapters did not train"
    ids = random_ids(2, 24)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert not hasattr(reloaded, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.export_model()(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
        module.model.eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == sorted(PAPER_TARGETS)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        reapplied = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(reapplied, reloaded(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_qlora_trains_4bit_base_and_merges_into_dequantized_copy(tiny_dir, tmp_path):
    module = healing_module(tiny_dir, quantize="nf4", lora_dropout=0.0)
    base = module.model.get_base_model()
    assert type(base.model.layers[0].mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert sum(p.numel() for p in module.model.parameters() if p.requires_grad) == ADAPTER_PARAMETERS
    ids = random_ids(4, 32, seed=3)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = module.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    module.model.eval()
    merged = merged_copy(module.model)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_qlora_fit_end_to_end(tiny_dir, tmp_path):
    module = HealingModule(model=str(tiny_dir), quantize="nf4", learning_rate=1e-2, warmup_steps=0)
    trainer = fit(module, tiny_dir, tmp_path, steps=2, run_dir=tmp_path / "run")
    assert trainer.callback_metrics["val_perplexity"] > 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    path = tmp_path / "qlora.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["state_dict"] and all(".lora_" in key for key in checkpoint["state_dict"])  # no 4-bit base
    assert any(key.endswith("gate_proj.base_layer.weight.absmax") for key in checkpoint[SLIM_KEY]["dropped"])
    resumed = HealingModule(model=str(tiny_dir), quantize="nf4", learning_rate=1e-2, warmup_steps=0)
    fit(resumed, tiny_dir, tmp_path, steps=2, run_dir=tmp_path / "resumed", ckpt_path=path)
    trained = {key: value for key, value in resumed.state_dict().items() if key in checkpoint["state_dict"]}
    assert trained.keys() == checkpoint["state_dict"].keys()
    for key, value in trained.items():
        torch.testing.assert_close(value, checkpoint["state_dict"][key], rtol=0, atol=0, msg=key)


def test_bad_settings_are_named(tiny_dir, monkeypatch):
    with pytest.raises(InputError, match="lora_rank 0 must be a positive"):
        HealingModule(lora_rank=0)
    with pytest.raises(InputError, match="quantize 'int3' is not known; choose one of nf4, fp4"):
        HealingModule(quantize="int3")
    with pytest.raises(
        InputError, match=r"\['fc1'\] match no linear module.*down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    ):
        healing_module(tiny_dir, target_modules=["up_proj", "fc1"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(InputError, match="needs the bitsandbytes package"):
        HealingModule(quantize="nf4")


def test_linear_names_of_opt():
    assert linear_module_names(make_tiny_model("opt")) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
