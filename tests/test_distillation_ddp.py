"""CoMe-mp teacher-forced under DDP (2 CPU processes, gloo) equals the one-process run.

The test runs this file as a script twice (``devices`` 1 and 2): Lightning's DDP launcher
starts the second rank by re-running the same command line.
"""

import sys
from pathlib import Path

import torch
from conftest import launch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()


def train(model_dir: str, devices: int, output: str) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_prune.callbacks import StageCallback
    from lightning_prune.data.datamodule import TextDataModule
    from lightning_prune.modules.distillation import LayerwiseDistillation
    from lightning_prune.stages import MergeStage

    class OrderedData(TextDataModule):
        """The same batch order in every epoch, so layer k sees the same data whichever epoch trains it."""

        def train_dataloader(self):
            return DataLoader(self.train_blocks, batch_size=self.hparams.batch_size, shuffle=False)

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    snapshot = Snapshot()
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = LayerwiseDistillation(model=model_dir, mode="mp", teacher_forced=True, learning_rates=[1e-2, 5e-3, 2e-3])
    data = OrderedData(tokenizer=model_dir, seq_len=16, num_train_samples=8, calibration_samples=4, batch_size=4, shard=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,  # this test's own sequential loader must not be sharded by Lightning
        callbacks=[StageCallback([MergeStage(num_layers=3, remerge=False)], run_dir=output), snapshot],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    torch.save(
        {
            "state": module.model.state_dict(),
            "before": snapshot.state,
            "epochs": trainer.current_epoch,
            "students": [m.student for m in module.mapping],
        },
        Path(output) / f"student-rank{trainer.global_rank}.pt",
    )


def run(model_dir: Path, devices: int, output: Path) -> list[dict]:
    output.mkdir()
    launch([HERE, model_dir, devices, output])
    return [torch.load(output / f"student-rank{rank}.pt", weights_only=True) for rank in range(devices)]


def test_ddp_teacher_forced_mp_equals_sequential(tiny_dir, tmp_path):
    (sequential,) = run(tiny_dir, 1, tmp_path / "one")
    ranks = run(tiny_dir, 2, tmp_path / "two")
    assert sequential["epochs"] == 3 and all(r["epochs"] == 2 for r in ranks)  # 3 merged layers: 3 stages vs 2
    changed = {key.split(".")[2] for key, value in sequential["state"].items() if not torch.equal(value, sequential["before"][key])}
    assert changed == {str(b) for b in sequential["students"]} and len(changed) == 3  # every merged layer trained, nothing else
    for rank in ranks:
        for key, value in sequential["state"].items():
            torch.testing.assert_close(rank["state"][key], value, rtol=0, atol=0, msg=key)
    # the saved student (rank 0 writes run_dir/model) holds every merged layer, including those trained on rank 1
    for directory in ("one", "two"):
        saved = load_file(tmp_path / directory / "model" / "model.safetensors")
        for key, value in sequential["state"].items():
            if key in saved:
                torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=f"{directory}: {key}")
        assert {key for key in sequential["state"] if ".layers." in key} <= set(saved)


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]), sys.argv[3])
