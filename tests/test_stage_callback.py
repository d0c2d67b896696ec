"""StageCallback with a prune stage: prunes in setup("fit") before the optimizer, resumes the same architecture, DDP agreement."""

import json
import os
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import launch, make_tiny_model, random_ids
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_prune.callbacks import StageCallback
from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions, score_layers
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.stages import PruneStage
from lightning_prune.stages.plan import check_stages, checkpoint_decisions

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
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def tied(model) -> bool:
    return Anatomy(model).lm_head.weight is Anatomy(model).embed_tokens.weight


def prune_callback(**options) -> StageCallback:
    return StageCallback([PruneStage(**options)])


def test_prunes_before_the_optimizer_and_resumes_the_same_architecture(tmp_path):
    module = TinyModule("llama_tied")
    callback = prune_callback(metric="bi", selection="iterative", num_layers=2, compensation="magnitude", batch_size=4)
    run = trainer(tmp_path, 2, callback)
    run.fit(module, datamodule=CalibrationData())
    assert Anatomy(module.model).num_layers == 4 and module.model.config.num_hidden_layers == 4
    assert set(module.optimized) == {id(p) for p in module.model.parameters()}
    checkpoint = tmp_path / "pruned.ckpt"
    run.save_checkpoint(checkpoint)
    saved = checkpoint_decisions(torch.load(checkpoint, weights_only=True))
    assert saved[0].removed_layers == callback.decisions[0].removed_layers
    assert (tmp_path / "decisions.json").is_file()

    resumed = TinyModule("llama_tied")
    resumed_callback = StageCallback([PruneStage(metric="bi", num_layers=2)], resume_from=str(checkpoint))
    trainer(tmp_path, 3, resumed_callback).fit(resumed, datamodule=CalibrationData(), ckpt_path=checkpoint)
    assert resumed_callback.decisions[0].removed_layers == callback.decisions[0].removed_layers
    assert Anatomy(resumed.model).num_layers == 4
    assert tied(module.model) and tied(resumed.model)  # magnitude compensation keeps tied embeddings tied


def test_resume_from_last_rebuilds_the_stored_decision_without_data(tmp_path):
    module = TinyModule()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    run = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[prune_callback(metric="random", num_layers=2), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    run.fit(module, datamodule=CalibrationData())
    stored = checkpoint_decisions(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True))[0].removed_layers
    assert len(stored) == 2

    # No calibration data anywhere: planning again would raise, so success means the stored decision was applied.
    resumed = StageCallback([PruneStage(metric="random", num_layers=2, seed=1)], resume_from="last")
    resumed_module = TinyModule()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    L.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[resumed, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(resumed_module, ckpt_path="last")
    assert resumed.decisions[0].removed_layers == stored
    assert Anatomy(resumed_module.model).num_layers == 4


def test_resume_without_resume_from_is_refused_before_weights_load(tmp_path):
    module = TinyModule()
    run = trainer(tmp_path, 1, StageCallback([PruneStage(layers=[1, 2])]))
    run.fit(module, datamodule=CalibrationData())
    checkpoint = tmp_path / "pruned.ckpt"
    run.save_checkpoint(checkpoint)
    with pytest.raises(InputError, match="resume through StageCallback"):
        trainer(tmp_path, 2, StageCallback([PruneStage(layers=[3, 4])])).fit(
            TinyModule(), datamodule=CalibrationData(), ckpt_path=checkpoint
        )


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    planted = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, planted)
    callback = StageCallback([PruneStage(num_layers=1)], resume_from=str(planted))
    with pytest.raises(InputError, match="refusing to load it"):
        trainer(tmp_path, 1, callback).fit(TinyModule(), datamodule=CalibrationData())
    assert not marker.exists()


def test_bad_targets_and_names_are_refused_before_any_work():
    config = make_tiny_model("llama").config
    with pytest.raises(InputError, match="exactly one of --layers, --num_layers or --ratio"):
        check_stages([PruneStage(num_layers=2, ratio=0.2)], config)
    with pytest.raises(InputError, match="unknown metric"):
        check_stages([PruneStage(metric="cos", num_layers=2)], config)
    with pytest.raises(InputError, match="unknown compensation"):
        check_stages([PruneStage(compensation="affine", num_layers=2)], config)


def test_ranks_that_decide_differently_are_caught(tmp_path):
    class Disagree(StageCallback):
        def _agree(self, trainer, decision):
            super()._agree(trainer, decision)
            raise AssertionError("agreement checked")

    with pytest.raises(AssertionError, match="agreement checked"):
        trainer(tmp_path, 1, Disagree([PruneStage(layers=[1])])).fit(TinyModule(), datamodule=CalibrationData())


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import lightning as L, torch
    from test_stage_callback import BLOCKS, TinyModule
    from test_stage_callback import CalibrationData
    from lightning_prune.callbacks import StageCallback
    from lightning_prune.stages import PruneStage

    callback = StageCallback([PruneStage(metric="{metric}", selection="iterative", num_layers=2, batch_size=2)], onload="{onload}")
    module = TinyModule()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir={out!r})
    trainer.fit(module, datamodule=CalibrationData())
    decision = callback.decisions[0].record
    first = {{k: v for k, v in decision["steps"][0]["scores"].items()}}
    weights = float(sum(p.double().sum() for p in module.model.parameters()))
    with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as handle:
        json.dump({{"removed": decision["removed_layers"], "scores": first, "layers": module.model.config.num_hidden_layers,
                   "optimized": len(module.optimized), "parameters": len(list(module.model.parameters())), "weights": weights}}, handle)
    """
)


@pytest.mark.parametrize(("metric", "onload"), [("block_influence", "none"), ("removal_perplexity", "none"), ("block_influence", "layer")])
def test_ddp_ranks_score_their_shards_reduce_and_agree(tmp_path, metric, onload):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), metric=metric, onload=onload))
    launch([script], PYTHONPATH=str(TESTS))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["removed"] == ranks[1]["removed"] and len(ranks[0]["removed"]) == 2
    assert ranks[0]["scores"] == ranks[1]["scores"]
    assert all(r["layers"] == 4 and r["optimized"] == r["parameters"] for r in ranks)
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)
    full = score_layers(TinyModule().model, BLOCKS, metric, ScoringOptions(progress=False, batch_size=2, candidates=[1, 2, 3, 4]))
    reduced = torch.tensor([v if v is not None else float("nan") for v in ranks[0]["scores"].values()])
    assert torch.allclose(reduced[1:5], full[1:5], rtol=1e-4)


def test_resume_into_another_model_is_refused(tmp_path):
    run = trainer(tmp_path, 1, StageCallback([PruneStage(layers=[1, 2])]))
    run.fit(TinyModule("llama"), datamodule=CalibrationData())
    checkpoint = tmp_path / "llama.ckpt"
    run.save_checkpoint(checkpoint)
    callback = StageCallback([PruneStage(layers=[1, 2])], resume_from=str(checkpoint))
    with pytest.raises(InputError, match="made for another model .*model_type llama vs mistral"):
        trainer(tmp_path, 2, callback).fit(TinyModule("mistral"), datamodule=CalibrationData(), ckpt_path=checkpoint)
