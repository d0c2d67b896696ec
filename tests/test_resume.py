"""Interrupt a pruned + LoRA run mid-epoch, resume with ``ckpt_path="last"``, get the uninterrupted result.

This is the recipe's path (``python train.py fit --config ... --ckpt_path last``): the pruning
callback rebuilds the stored decision in ``setup`` (no ``resume_from``, no re-scoring) and
``TextDataModule`` skips the batches the interrupted epoch already trained on.

Tolerance: the resumed run must match the uninterrupted one to 1e-6 (absolute) in every adapter
weight and in the final perplexity. LoRA dropout is 0 here because Lightning does not store the
global RNG state in a checkpoint (with dropout the masks after resuming would differ).
"""

import lightning as L
import pytest
import torch
from conftest import make_tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune.callbacks.pruning import LayerPruningCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.modules.healing import HealingModule

STEPS, STOP_AT = 6, 3  # 8 batches per epoch: the interruption and the end are both mid-epoch


class Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == STOP_AT:
            raise RuntimeError("simulated crash")


def run(model_dir, tmp_path, name, *, resume=None, extra=()):
    L.seed_everything(0)
    pruning = LayerPruningCallback(metric="block_influence", num_layers=2, compensation="magnitude")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True)
    module = HealingModule(model=str(model_dir), lora_dropout=0.0, learning_rate=1e-2, warmup_steps=2)
    data = TextDataModule(tokenizer=str(model_dir), seq_len=32, num_train_samples=16, calibration_samples=4, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[pruning, checkpoint, *extra], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return module, pruning, data


def final_state(module, data):
    adapters = {k: v.detach().clone() for k, v in module.model.state_dict().items() if "lora_" in k}
    return adapters, perplexity(module.export_model(), data.calibration_blocks(), progress=False)


def test_resume_mid_epoch_equals_uninterrupted(tiny_dir, tmp_path):
    module, pruning, data = run(tiny_dir, tmp_path, "full")
    expected, expected_ppl = final_state(module, data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_dir, tmp_path, "crashed", extra=[Interrupt()])
    assert 0 < torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=False)["global_step"] < STEPS
    resumed_module, resumed_pruning, data = run(tiny_dir, tmp_path, "crashed", resume="last")
    assert resumed_pruning.decision["removed_layers"] == pruning.decision["removed_layers"]
    assert resumed_module.trainer.global_step == STEPS
    actual, actual_ppl = final_state(resumed_module, data)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)
    assert actual_ppl == pytest.approx(expected_ppl, abs=1e-6)


def test_resume_with_another_model_is_refused(tiny_dir, tmp_path, tiny_tokenizer):
    run(tiny_dir, tmp_path, "llama", extra=[])
    other = tmp_path / "tiny-qwen2"
    make_tiny_model("qwen2").save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(InputError, match="checkpoint is from model .*tiny-llama.*'model_type': 'llama'.* but this run heals .*tiny-qwen2"):
        run(other, tmp_path, "qwen2", resume=str(tmp_path / "llama" / "last.ckpt"))
