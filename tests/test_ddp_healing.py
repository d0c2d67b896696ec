"""Prune + LoRA healing under DDP (2 CPU processes, gloo) agrees with the one-process run.

The test runs this file as a script (``devices`` 1 and 2); Lightning's DDP launcher starts
the second rank by re-running the same command line. Four training blocks form one global
batch (4 blocks on one process, 2 + 2 on two ranks), so every step of both runs averages the
gradient over the same 4 blocks. A second test runs two ranks with the StageCallback's
evaluation on (rank 0 measures, the others wait), which must finish rather than deadlock.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import launch

HERE = Path(__file__).resolve()
STEPS = 3


def train(model_dir: str, devices: int, output: str, evaluate: bool = False, sparsify: bool = False) -> None:
    import lightning as L

    from lightning_prune.callbacks import StageCallback
    from lightning_prune.data.datamodule import TextDataModule
    from lightning_prune.evaluation.suite import EvaluationSuite
    from lightning_prune.modules.healing import HealingModule
    from lightning_prune.stages import PruneStage, SparsifyStage

    class Record(L.Callback):
        losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    torch.set_num_threads(1)
    L.seed_everything(0)
    evaluation = EvaluationSuite(data="wikitext2", seq_len=32, num_samples=2) if evaluate else None
    # one calibration block per batch: each block's activations are computed alike on 1 and 2 ranks
    stage = (
        SparsifyStage(method="sparsegpt", allocation="dlp", sparsity=0.5, batch_size=1)
        if sparsify
        else PruneStage(metric="block_influence", selection="iterative", num_layers=2, compensation="magnitude")
    )
    stages = StageCallback(
        [stage],
        evaluation=evaluation,
        run_dir=str(Path(output) / "run"),
    )
    module = HealingModule(model=model_dir, lora_dropout=0.0, learning_rate=1e-2, warmup_steps=0)
    data = TextDataModule(tokenizer=model_dir, seq_len=32, num_train_samples=4, calibration_samples=4, batch_size=4 // devices)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS,
        callbacks=[stages, Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=output,
    )
    trainer.fit(module, datamodule=data)
    torch.save(
        {
            "removed": getattr(stages.decisions[0], "removed_layers", None),
            "masks": dict(stages.decisions[0].masks) if sparsify else None,
            "losses": Record.losses,
            "state": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
        },
        Path(output) / f"rank{trainer.global_rank}.pt",
    )


def run(model_dir: Path, devices: int, output: Path, evaluate: bool = False, timeout: int = 300, mode: str = "plain") -> list[dict]:
    output.mkdir()
    launch([HERE, model_dir, devices, output, "eval" if evaluate else mode], timeout=timeout)
    return [torch.load(output / f"rank{rank}.pt", weights_only=True) for rank in range(devices)]


def test_ddp_prunes_alike_and_trains_like_one_process(tiny_dir, tmp_path):
    (single,) = run(tiny_dir, 1, tmp_path / "one")
    ranks = run(tiny_dir, 2, tmp_path / "two")
    assert len(single["removed"]) == 2
    assert ranks[0]["removed"] == ranks[1]["removed"] == single["removed"]  # same layers on every rank
    for key, value in ranks[0]["state"].items():  # adapters and (compensated) base identical across ranks
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)
    lora = [key for key in single["state"] if "lora_B" in key]
    assert lora and all(single["state"][key].abs().sum() > 0 for key in lora)  # the adapters did train
    for key, value in single["state"].items():  # the same global batch gives the same weights
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert len(single["losses"]) == STEPS
    global_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(global_losses), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    for directory in ("one", "two"):  # rank 0 saved the merged model and the adapter
        run_dir = tmp_path / directory / "run"
        assert json.loads((run_dir / "model" / "config.json").read_text())["num_hidden_layers"] == 4
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_ddp_with_evaluation_finishes_and_measures_every_stage(tiny_dir, tmp_path):
    ranks = run(tiny_dir, 2, tmp_path / "two", evaluate=True, timeout=240)
    assert ranks[0]["removed"] == ranks[1]["removed"] and len(ranks[0]["removed"]) == 2
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)
    metrics = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    assert {"dense", "after prune", "after training"} <= set(metrics)
    assert metrics["dense"]["num_layers"] == 6
    assert metrics["after prune"]["num_layers"] == metrics["after training"]["num_layers"] == 4
    for label in ("dense", "after prune", "after training"):
        assert set(metrics[label]["perplexity"]) == {"wikitext2"} and metrics[label]["perplexity"]["wikitext2"] > 1
    assert metrics["after training"]["perplexity"] != metrics["after prune"]["perplexity"]  # measured after healing


def test_ddp_sparsity_calibrates_on_shards_and_masks_like_one_process(tiny_dir, tmp_path):
    """Each rank calibrates SparseGPT + DLP on half the blocks; the all-reduced statistics give one process's masks."""
    (single,) = run(tiny_dir, 1, tmp_path / "one", mode="sparsify")
    ranks = run(tiny_dir, 2, tmp_path / "two", mode="sparsify")
    assert single["masks"] and ranks[0]["masks"].keys() == single["masks"].keys()
    for name, mask in single["masks"].items():
        assert torch.equal(ranks[0]["masks"][name], mask) and torch.equal(ranks[1]["masks"][name], mask), name
    plan = json.loads((tmp_path / "two" / "run" / "decisions.json").read_text())["decisions"][0]
    assert plan["layer_sparsity"] == json.loads((tmp_path / "one" / "run" / "decisions.json").read_text())["decisions"][0]["layer_sparsity"]


if __name__ == "__main__":
    mode = sys.argv[4] if len(sys.argv) > 4 else "plain"
    train(sys.argv[1], int(sys.argv[2]), sys.argv[3], evaluate=mode == "eval", sparsify=mode == "sparsify")
