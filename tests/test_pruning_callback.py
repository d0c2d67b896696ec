"""LayerPruningCallback: prunes in setup("fit") before the optimizer, resumes the same architecture, DDP agreement."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_tiny_model, random_ids
from torch.utils.data import DataLoader

from lightning_prune.callbacks.pruning import CHECKPOINT_KEY, LayerPruningCallback, check_agreement
from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions, score_layers
from lightning_prune.model.anatomy import Anatomy

TESTS = Path(__file__).parent
BLOCKS = random_ids(8, 24, seed=11)


class TinyModule(L.LightningModule):
    """A tiny causal LM trained with the next-token loss; the optimizer records what it was given."""

    def __init__(self, family: str = "llama"):
        super().__init__()
        self.model = make_tiny_model(family).train()
        self.optimized: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def configure_optimizers(self):
        parameters = list(self.model.parameters())
        self.optimized = [id(p) for p in parameters]
        return torch.optim.SGD(parameters, lr=1e-3)

    def train_dataloader(self):
        return DataLoader(list(random_ids(8, 16, seed=2)), batch_size=4)


class CalibrationData(L.LightningDataModule):
    def calibration_blocks(self):
        return BLOCKS

    def train_dataloader(self):
        return DataLoader(list(random_ids(8, 16, seed=2)), batch_size=4)


def trainer(tmp_path, steps: int, callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )


def test_prunes_before_the_optimizer_and_resumes_the_same_architecture(tmp_path):
    module = TinyModule("llama_tied")
    callback = LayerPruningCallback(metric="bi", selection="iterative", num_layers=2, compensation="magnitude", batch_size=4)
    run = trainer(tmp_path, 2, callback)
    run.fit(module, datamodule=CalibrationData())
    assert Anatomy(module.model).num_layers == 4 and module.model.config.num_hidden_layers == 4
    assert set(module.optimized) == {id(p) for p in module.model.parameters()}
    assert callback.decision["untied_embeddings"] is False  # magnitude compensation keeps tied embeddings tied
    assert Anatomy(module.model).lm_head.weight is Anatomy(module.model).embed_tokens.weight
    checkpoint = tmp_path / "pruned.ckpt"
    run.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)[CHECKPOINT_KEY]
    assert saved["removed_layers"] == callback.decision["removed_layers"]

    resumed = TinyModule("llama_tied")
    resumed_callback = LayerPruningCallback(metric="bi", selection="iterative", num_layers=2, compensation="magnitude", resume_from=str(checkpoint))
    trainer(tmp_path, 3, resumed_callback).fit(resumed, datamodule=CalibrationData(), ckpt_path=checkpoint)
    assert resumed_callback.decision["removed_layers"] == callback.decision["removed_layers"]
    assert Anatomy(resumed.model).num_layers == 4
    assert Anatomy(resumed.model).lm_head.weight is Anatomy(resumed.model).embed_tokens.weight


def test_fit_ckpt_path_alone_rebuilds_the_stored_decision_and_refuses_other_layers(tmp_path):
    module = TinyModule()
    run = trainer(tmp_path, 1, LayerPruningCallback(metric="random", num_layers=2, seed=0, calibration_blocks=BLOCKS))
    run.fit(module)
    checkpoint = tmp_path / "random.ckpt"
    run.save_checkpoint(checkpoint)
    stored = torch.load(checkpoint, weights_only=False)[CHECKPOINT_KEY]["removed_layers"]
    assert len(stored) == 2

    # No calibration data anywhere: scoring again would raise, so success means the stored decision was applied.
    resumed = LayerPruningCallback(metric="random", num_layers=2, seed=1)
    resumed_module = TinyModule()
    trainer(tmp_path, 2, resumed).fit(resumed_module, ckpt_path=checkpoint)
    assert resumed.decision["removed_layers"] == stored
    assert Anatomy(resumed_module.model).num_layers == 4

    other = [layer for layer in range(1, 5) if layer not in stored][:2]
    with pytest.raises(InputError, match=rf"removed layers \[{stored[0]}, {stored[1]}\] but this run is configured to remove"):
        trainer(tmp_path, 2, LayerPruningCallback(layers=other)).fit(TinyModule(), ckpt_path=checkpoint)


def test_bad_targets_and_names_are_refused_at_construction():
    with pytest.raises(InputError, match="exactly one of num_layers, ratio or layers"):
        LayerPruningCallback(num_layers=2, ratio=0.2)
    with pytest.raises(InputError, match="unknown metric"):
        LayerPruningCallback(metric="cos", num_layers=2)
    with pytest.raises(InputError, match="unknown compensation"):
        LayerPruningCallback(compensation="affine", num_layers=2)


def test_check_agreement_raises_on_any_difference():
    check_agreement(torch.tensor([[3, 2], [3, 2]]))
    with pytest.raises(RuntimeError, match="different pruning decisions"):
        check_agreement(torch.tensor([[3, 2], [3, 1]]))


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import lightning as L, torch
    from test_pruning_callback import BLOCKS, TinyModule
    from lightning_prune.callbacks.pruning import LayerPruningCallback

    callback = LayerPruningCallback(metric="{metric}", selection="iterative", num_layers=2, calibration_blocks=BLOCKS, batch_size=2)
    module = TinyModule()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    first = {{k: v for k, v in callback.decision["steps"][0]["scores"].items()}}
    weights = float(sum(p.double().sum() for p in module.model.parameters()))
    with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as handle:
        json.dump({{"removed": callback.decision["removed_layers"], "scores": first, "layers": module.model.config.num_hidden_layers,
                   "optimized": len(module.optimized), "parameters": len(list(module.model.parameters())), "weights": weights}}, handle)
    """
)


@pytest.mark.parametrize("metric", ["block_influence", "removal_perplexity"])
def test_ddp_ranks_score_their_shards_reduce_and_agree(tmp_path, metric):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), metric=metric))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}  # code under test
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["removed"] == ranks[1]["removed"] and len(ranks[0]["removed"]) == 2
    assert ranks[0]["scores"] == ranks[1]["scores"]
    assert all(r["layers"] == 4 and r["optimized"] == r["parameters"] for r in ranks)
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)
    full = score_layers(TinyModule().model, BLOCKS, metric, ScoringOptions(progress=False, batch_size=2, candidates=[1, 2, 3, 4]))
    reduced = torch.tensor([v if v is not None else float("nan") for v in ranks[0]["scores"].values()])
    assert torch.allclose(reduced[1:5], full[1:5], rtol=1e-4)
