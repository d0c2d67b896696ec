"""LayerwiseDistillation (CoMe-sp / CoMe-mp) after a MergeStage run by StageCallback, on a tiny Llama."""

import json

import lightning as L
import pytest
import torch
from conftest import make_tiny_model, random_ids, read_decision

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.merging.distill import BoundaryCache, distillation_loss, hidden_kl, layer_outputs
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.modules.distillation import LayerwiseDistillation
from lightning_prune.stages import MergeDecision, MergeStage
from lightning_prune.stages.plan import checkpoint_decisions


def trainer(tmp_path, **options):
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    return L.Trainer(**{**settings, **options})


def data(tiny_dir, **options):
    settings = dict(tokenizer=str(tiny_dir), seq_len=16, num_train_samples=8, calibration_samples=4, batch_size=4)
    return TextDataModule(**{**settings, **options})


def test_kl_of_identical_states_is_zero_and_matches_definition():
    teacher = torch.randn(2, 5, 8)
    assert float(hidden_kl(teacher, teacher.clone())) == 0.0
    student = torch.randn(2, 5, 8)
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(hidden_kl(teacher, student), expected)
    assert float(hidden_kl(teacher, student)) > 0
    assert hidden_kl(teacher.half(), student.half()).dtype == torch.float32


def test_layer_outputs_keep_graph_and_stop_early():
    model = make_tiny_model("llama")
    ids = random_ids()
    outputs = layer_outputs(model, ids, [1, 3])
    assert sorted(outputs) == [1, 3] and outputs[3].requires_grad
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(outputs[3], hidden[4], rtol=0, atol=0)


def test_boundary_cache_spills_to_disk_and_computes_once(tmp_path):
    model = make_tiny_model("llama")
    in_memory = BoundaryCache(model, [2], [3])
    on_disk = BoundaryCache(model, [2], [3], memory_bytes=0, directory=str(tmp_path / "cache"))
    ids = random_ids()
    for _ in range(2):
        a, b = in_memory.get(ids), on_disk.get(ids)
        torch.testing.assert_close(a["inputs"][2], b["inputs"][2], rtol=0, atol=0)
        torch.testing.assert_close(a["targets"][3], b["targets"][3], rtol=0, atol=0)
    assert in_memory.teacher_forwards == on_disk.teacher_forwards == 1
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def merging(run_dir, num_layers=3, **options) -> StageCallback:
    """StageCallback with one MergeStage; its run directory is ``run_dir``."""
    return StageCallback([MergeStage(num_layers=num_layers, **options)], run_dir=str(run_dir))


def fit_merged(tiny_dir, tmp_path, num_layers=3, **module_options):
    module = LayerwiseDistillation(model=str(tiny_dir), **module_options)
    callback = merging(tmp_path / "run", num_layers)
    run = trainer(tmp_path, max_epochs=1, callbacks=[callback])
    module.configure_model()
    original = {k: v.clone() for k, v in module.model.state_dict().items()}
    run.fit(module, datamodule=data(tiny_dir))
    return module, callback, original, run


def merged_parameter_count(module):
    layers = Anatomy(module.model).layers
    return sum(p.numel() for m in module.mapping for p in layers[m.student].parameters())


@pytest.mark.parametrize(
    "options",
    [dict(mode="sp", learning_rate=1e-3), dict(mode="mp"), dict(mode="mp", teacher_forced=True)],
    ids=["sp", "mp", "mp-teacher-forced"],
)
def test_fit_trains_only_merged_layers(tiny_dir, tmp_path, options):
    module, callback, _, run = fit_merged(tiny_dir, tmp_path, **options)
    teacher = LayerwiseDistillation(model=str(tiny_dir))
    teacher.configure_model()
    assert Anatomy(module.model).num_layers == 3 and Anatomy(module.teacher).num_layers == 6
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == merged_parameter_count(module) > 0
    assert all(torch.equal(a, b) for a, b in zip(module.teacher.state_dict().values(), teacher.model.state_dict().values()))
    (decision,) = callback.decisions
    assert isinstance(decision, MergeDecision)
    groups = decision.groups
    assert module.groups == groups and len(groups) == 3  # handed to the module by receive_decisions
    layers, original_layers = Anatomy(module.model).layers, Anatomy(teacher.model).layers
    for index, group in enumerate(groups):
        if len(group) == 1:  # unmerged layers are the original ones, untouched
            for a, b in zip(layers[index].parameters(), original_layers[group[0]].parameters()):
                assert torch.equal(a, b)
    stored = read_decision(tmp_path / "run", "merge")
    assert stored["groups"] == groups
    assert stored["mapping"][0]["teacher_last"] == max(groups[module.mapping[0].student])
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3  # the distilled student, not the teacher
    if options["mode"] == "mp":
        assert run.current_epoch == len(module.mapping)  # one epoch per merged layer
    if options.get("teacher_forced"):
        assert module.boundary_cache().teacher_forwards == 2  # 8 blocks / batch 4, computed once


def test_merged_layers_move_and_loss_falls_in_sp(tiny_dir, tmp_path):
    module = LayerwiseDistillation(model=str(tiny_dir), mode="sp", learning_rate=1e-2)
    callback = merging(tmp_path / "run", 4)
    datamodule = data(tiny_dir)
    trainer(tmp_path, max_epochs=1, callbacks=[callback], limit_train_batches=0).fit(module, datamodule=datamodule)
    batch = datamodule.train_blocks[:4]

    def loss():
        with torch.no_grad():
            return float(module.sp_loss(batch))

    before = loss()
    trainer(tmp_path, max_epochs=4).fit(module, datamodule=datamodule)
    assert loss() < before


@pytest.mark.parametrize("loss", ["mse_norm", "kl_raw", "kl_norm"])
def test_sp_loss_sums_the_configured_loss_over_the_mapping(tiny_dir, tmp_path, loss):
    options = {} if loss == "mse_norm" else {"loss": loss}  # mse_norm is the default
    module = LayerwiseDistillation(model=str(tiny_dir), mode="sp", **options)
    callback = merging(tmp_path / "run", 4)
    datamodule = data(tiny_dir)
    trainer(tmp_path, max_epochs=1, callbacks=[callback], limit_train_batches=0).fit(module, datamodule=datamodule)
    batch = datamodule.train_blocks[:4]
    with torch.no_grad():
        targets = layer_outputs(module.teacher, batch, [m.teacher_last for m in module.mapping])
        predictions = layer_outputs(module.model, batch, [m.student for m in module.mapping])
        norm = Anatomy(module.model).final_norm
        expected = sum(distillation_loss(loss, targets[m.teacher_last], predictions[m.student], norm=norm) for m in module.mapping)
        torch.testing.assert_close(module.sp_loss(batch), expected)
    assert module.hparams.loss == loss and float(expected) > 0


def test_short_learning_rate_list_names_how_many(tiny_dir, tmp_path):
    module = LayerwiseDistillation(model=str(tiny_dir), mode="mp", learning_rates=[1e-4])
    callback = merging(tmp_path / "run", 3, remerge=False)
    with pytest.raises(InputError, match="learning_rates has 1 entries but the merge produced 3 merged layers; give at least 3"):
        trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module, datamodule=data(tiny_dir))
    assert not (tmp_path / "run" / "model").exists()  # refused before any training


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(mode="xp"), "choose one of sp, mp"),
        (dict(mode="sp", teacher_forced=True), "mode 'mp' only"),
        (dict(loss="kl"), "choose one of kl_raw, kl_norm, mse_norm, cosine"),
    ],
)
def test_bad_module_options(options, message):
    with pytest.raises(InputError, match=message):
        LayerwiseDistillation(**options)


def test_resume_rebuilds_merged_architecture(tiny_dir, tmp_path):
    module = LayerwiseDistillation(model=str(tiny_dir), mode="sp", learning_rate=1e-3)
    callback = merging(tmp_path / "run", 4)
    run = trainer(tmp_path, max_epochs=1, callbacks=[callback])
    run.fit(module, datamodule=data(tiny_dir))
    groups = callback.decisions[0].groups
    path = tmp_path / "first.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint_decisions(checkpoint)[0].groups == groups
    assert "merge_groups" not in checkpoint  # the merge lives in checkpoint["decisions"] only
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])

    resumed = LayerwiseDistillation(model=str(tiny_dir), mode="sp", learning_rate=0.0)
    resumed_callback = StageCallback([MergeStage(num_layers=4)], run_dir=str(tmp_path / "resumed"), resume_from=str(path))
    run = trainer(tmp_path, max_epochs=1, callbacks=[resumed_callback], limit_train_batches=0)
    run.fit(resumed, datamodule=data(tiny_dir), ckpt_path=str(path))
    assert resumed_callback.decisions[0].groups == groups and resumed.groups == groups
    assert not (tmp_path / "resumed" / "decisions.json").exists()  # rebuilt from the checkpoint, not planned again
    for (key, a), b in zip(resumed.model.state_dict().items(), module.model.state_dict().values()):
        assert torch.equal(a, b), key

    checkpoint["decisions"]["plan"]["decisions"][0]["groups"] = [[0, 1], [2, 3], [4, 5], [6, 7]]
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    bad = LayerwiseDistillation(model=str(tiny_dir), mode="sp")
    bad_callback = StageCallback([MergeStage(num_layers=4)], run_dir=str(tmp_path / "bad"), resume_from=str(tmp_path / "bad.ckpt"))
    with pytest.raises(InputError, match="8-layer original model, but the model has 6 layers"):
        trainer(tmp_path, max_epochs=1, callbacks=[bad_callback]).fit(bad, datamodule=data(tiny_dir), ckpt_path=str(tmp_path / "bad.ckpt"))
    assert not (tmp_path / "bad").exists()


def test_resume_without_resume_from_is_refused(tiny_dir, tmp_path):
    module = LayerwiseDistillation(model=str(tiny_dir), mode="sp", learning_rate=1e-3)
    run = trainer(tmp_path, max_epochs=1, callbacks=[merging(tmp_path / "run", 4)], limit_train_batches=1)
    run.fit(module, datamodule=data(tiny_dir))
    path = tmp_path / "first.ckpt"
    run.save_checkpoint(path)
    other = LayerwiseDistillation(model=str(tiny_dir), mode="sp")
    with pytest.raises(InputError, match="resume through StageCallback"):
        trainer(tmp_path, max_epochs=1, callbacks=[merging(tmp_path / "other", 2)]).fit(
            other, datamodule=data(tiny_dir), ckpt_path=str(path)
        )
