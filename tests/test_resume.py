"""Interrupt a pruned + LoRA run mid-epoch, resume with ``ckpt_path="last"``, get the uninterrupted result.

This is the public path: ``StageCallback(resume_from="last")`` rebuilds the decision stored in
the checkpoint in ``setup`` (no re-scoring), ``trainer.fit(..., ckpt_path="last")`` loads the
weights, and ``TextDataModule`` skips the batches the interrupted epoch already trained on. The
recipe path (``lightning-prune fit --config ... --ckpt_path ...``) sets ``resume_from`` itself.

Tolerance: the resumed run must match the uninterrupted one to 1e-6 (absolute) in every adapter
weight and in the final perplexity. LoRA dropout is 0 here because Lightning does not store the
global RNG state in a checkpoint (with dropout the masks after resuming would differ).
"""

import json
import shutil

import lightning as L
import pytest
import torch
from conftest import make_tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune.callbacks import StageCallback
from lightning_prune.cli import main
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.modules.healing import HealingModule
from lightning_prune.modules.slim import SLIM_KEY
from lightning_prune.results import weight_bytes
from lightning_prune.stages import PruneStage
from lightning_prune.stages.plan import checkpoint_decisions

STEPS, STOP_AT = 6, 3  # 8 batches per epoch: the interruption and the end are both mid-epoch


class Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == STOP_AT:
            raise RuntimeError("simulated crash")


def run(model_dir, tmp_path, name, *, resume=None, extra=(), tokenizer=None):
    L.seed_everything(0)
    stages = StageCallback(
        [PruneStage(metric="block_influence", num_layers=2, compensation="magnitude")],
        run_dir=str(tmp_path / name / "run"),
        resume_from=resume,
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True)
    module = HealingModule(model=str(model_dir), lora_dropout=0.0, learning_rate=1e-2, warmup_steps=2)
    data = TextDataModule(tokenizer=str(tokenizer or model_dir), seq_len=32, num_train_samples=16, calibration_samples=4, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=[stages, checkpoint, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path / name,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return module, stages, data


def final_state(module, data):
    adapters = {k: v.detach().clone() for k, v in module.model.state_dict().items() if "lora_" in k}
    return adapters, perplexity(module.export_model(), data.calibration_blocks(), progress=False)


def test_resume_mid_epoch_equals_uninterrupted(tiny_dir, tmp_path):
    module, stages, data = run(tiny_dir, tmp_path, "full")
    expected, expected_ppl = final_state(module, data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_dir, tmp_path, "crashed", extra=[Interrupt()])
    crashed = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert 0 < crashed["global_step"] < STEPS
    assert_slim(crashed, module, tmp_path / "crashed" / "last.ckpt", tiny_dir)
    assert checkpoint_decisions(crashed)[0].removed_layers == stages.decisions[0].removed_layers
    resumed_module, resumed_stages, data = run(tiny_dir, tmp_path, "crashed", resume="last")
    assert resumed_stages.decisions[0].removed_layers == stages.decisions[0].removed_layers
    assert resumed_module.model.config.num_hidden_layers == 4
    assert resumed_module.trainer.global_step == STEPS
    actual, actual_ppl = final_state(resumed_module, data)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)
    assert actual_ppl == pytest.approx(expected_ppl, abs=1e-6)


def assert_slim(checkpoint, module, path, model_dir):
    """The checkpoint holds the adapters and no frozen tensor; its file is a small fraction of the model."""
    trainable = {f"model.{k}" for k, p in module.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    slim = checkpoint[SLIM_KEY]
    assert slim["source"] == str(model_dir)
    assert set(slim["dropped"]) == set(module.state_dict()) - trainable
    dense = make_tiny_model("llama")
    model_bytes = weight_bytes(dense)  # 1.02 MB for the tiny Llama
    trainable_bytes = sum(module.state_dict()[k].numel() * 4 for k in trainable)  # LoRA r 2 on 4 layers: 18.4 kB
    # adapters + 2 AdamW moments, plus the file's per-tensor records and the loop state
    assert path.stat().st_size < 3 * trainable_bytes + 60_000
    assert path.stat().st_size < 0.1 * model_bytes
    print(f"checkpoint {path.stat().st_size:,} bytes; trainable {trainable_bytes:,}; model {model_bytes:,}")


def test_resume_from_a_slim_checkpoint_needs_its_base_model(tiny_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(base, tmp_path, "crashed", extra=[Interrupt()])
    shutil.rmtree(base)
    with pytest.raises(InputError, match=rf"frozen base \(\d+ tensors\) is rebuilt from model '{base}', which could not"):
        run(base, tmp_path, "crashed", resume="last", tokenizer=tiny_dir)


def test_resume_with_another_model_is_refused(tiny_dir, tmp_path, tiny_tokenizer):
    run(tiny_dir, tmp_path, "llama", extra=[])
    other = tmp_path / "tiny-qwen2"
    make_tiny_model("qwen2").save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    checkpoint = str(tmp_path / "llama" / "last.ckpt")
    # the StageCallback compares the plan's fingerprint before it replays anything
    with pytest.raises(InputError, match=r"last.ckpt' was made for another model \(model_type llama vs qwen2"):
        run(other, tmp_path, "qwen2", resume=checkpoint)


TINY = [
    "--prune.num_layers",
    "2",
    "--trainer.max_steps",
    "2",
    "--trainer.val_check_interval",
    "2",
    "--trainer.accumulate_grad_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--data.init_args.seq_len",
    "32",
    "--data.init_args.num_train_samples",
    "8",
    "--data.init_args.num_val_samples",
    "2",
    "--data.init_args.calibration_samples",
    "4",
    "--evaluation.seq_len",
    "32",
    "--evaluation.num_samples",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


def test_recipe_checkpoint_validates_with_the_decided_architecture(tiny_dir, tmp_path):
    """``validate --ckpt_path`` on a prune_heal checkpoint: the CLI hands it to StageCallback, which rebuilds 4 layers."""
    run_dir = tmp_path / "run"
    main(["fit", "--config", "prune_heal", "--run_dir", str(run_dir), "--model.init_args.model", str(tiny_dir), *TINY])
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    removed = checkpoint_decisions(torch.load(checkpoint, weights_only=True))[0].removed_layers
    assert removed == json.loads((run_dir / "decisions.json").read_text())["decisions"][0]["removed_layers"]
    assert len(removed) == 2
    validated = tmp_path / "validated"
    main(
        [
            "validate",
            "--config",
            "prune_heal",
            "--run_dir",
            str(validated),
            "--model.init_args.model",
            str(tiny_dir),
            *TINY,
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    # the plan was not made again (no calibration scoring, no decisions.json in the new run directory)
    assert not (validated / "decisions.json").exists()
    logged = (validated / "logs" / "metrics.csv").read_text()
    assert "val_perplexity" in logged
