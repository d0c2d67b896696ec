"""``GapDistillStage``: the layers next to a removal gap learn the dense model's hidden state there."""

import copy
import json

import pytest
import torch
from conftest import assert_one_line_error, make_tiny_model, random_ids, run_cli
from safetensors.torch import save_file

from lightning_prune.errors import InputError
from lightning_prune.merging.distill import distillation_loss, layer_outputs
from lightning_prune.modules.healing import HealingModule
from lightning_prune.stages import GapDistillStage, MergeStage, PruneStage, SparsifyStage
from lightning_prune.stages.gap_distill import gap_windows, layer_spans
from lightning_prune.stages.plan import apply_decisions, check_stages, plan_json, plan_tensors, read_plan

FAST = dict(steps=40, lr=3e-3, batch_size=4)


def run_stages(model, stages, blocks):
    """Observe, then follow + plan each stage on ``blocks`` (what StageCallback does in one process)."""
    for stage in stages:
        stage.observe(model, blocks)
    decisions = []
    for stage in stages:
        stage.follow(decisions)
        decisions.append(stage.plan(model, blocks, progress=False))
    return decisions


def gap_loss(student, teacher, blocks, student_layer, teacher_layer):
    with torch.no_grad():
        target = layer_outputs(teacher, blocks, [teacher_layer])[teacher_layer]
        prediction = layer_outputs(student, blocks, [student_layer])[student_layer]
    return float(distillation_loss("mse_norm", target, prediction))


def test_windows_follow_the_gaps():
    pruned = layer_spans(6, [_decision("prune", removed_layers=[2, 3])])
    assert pruned == [[0], [1], [4], [5]]
    assert gap_windows(pruned, 6, 0, 1) == [{"start": 2, "end": 3, "gaps": [2], "target": 4}]
    assert gap_windows(pruned, 6, 1, 1) == [{"start": 1, "end": 3, "gaps": [2], "target": 4}]
    end = layer_spans(6, [_decision("prune", removed_layers=[5])])
    assert gap_windows(end, 6, 0, 1) == []  # nothing after the last layer
    assert gap_windows(end, 6, 1, 0) == [{"start": 4, "end": 5, "gaps": [5], "target": 5}]
    close = layer_spans(6, [_decision("prune", removed_layers=[1, 3])])  # [0], [2], [4], [5]
    assert gap_windows(close, 6, 1, 1) == [{"start": 0, "end": 3, "gaps": [1, 2], "target": 4}]
    merged = layer_spans(6, [_decision("merge", groups=[[0], [1, 2], [3], [4], [5]])])
    assert gap_windows(merged, 6, 0, 1) == [{"start": 2, "end": 3, "gaps": [2], "target": 3}]


def _decision(kind, **record):
    from lightning_prune.stages.plan import DECISIONS

    return DECISIONS[kind].from_json(record, {})


def test_trains_only_the_layer_after_the_gap_and_lowers_held_out_loss():
    teacher = make_tiny_model("llama")
    student = copy.deepcopy(teacher)
    train, held_out = random_ids(16, 16, seed=1), random_ids(8, 16, seed=2)
    prune = PruneStage(layers=[2], compensation="magnitude")
    prune.observe(student, train)
    prune_decision = prune.plan(student, train, progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loss_before = gap_loss(student, teacher, held_out, 2, 3)
    stage = GapDistillStage(**FAST)
    stage.observe(teacher, train)
    stage.follow([prune_decision])
    decision = stage.plan(student, train, progress=False)
    loss_after = gap_loss(student, teacher, held_out, 2, 3)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    window = decision.record["windows"][0]
    assert (window["start"], window["end"], window["target"]) == (2, 3, 3)
    assert window["loss_after"] < window["loss_before"]
    changed = {k.split(".")[2] for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"2"}  # model.layers.2.* only: embeddings, norms, other layers untouched


def test_decision_replays_through_decisions_files(tmp_path):
    dense = make_tiny_model("qwen2")
    model = copy.deepcopy(dense)
    blocks = random_ids(8, 16, seed=3)
    decisions = run_stages(model, [PruneStage(layers=[1, 4]), GapDistillStage(layers_before=1, steps=8, lr=3e-3)], blocks)
    (tmp_path / "decisions.json").write_text(json.dumps(plan_json(decisions, {}, None)))
    save_file(plan_tensors(decisions), tmp_path / "decisions.safetensors")
    replayed, _ = read_plan(tmp_path)
    fresh = copy.deepcopy(dense)
    apply_decisions(fresh, replayed)
    ids = random_ids(2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert [d.kind for d in replayed] == ["prune", "distill_gap"]
    assert replayed[1].positions() == [0, 1, 2, 3]  # windows [0, 2) and [2, 4) around gaps before 1 and 3


def test_after_merge_trains_the_merged_layer_and_the_next():
    model = make_tiny_model("llama")
    blocks = random_ids(8, 16, seed=4)
    decisions = run_stages(model, [MergeStage(num_layers=1, batch_size=4), GapDistillStage(layers_before=1, **FAST)], blocks)
    (merged,) = decisions[0].merged_positions()
    assert decisions[1].positions() == list(range(merged, min(merged + 2, 5)))


@pytest.mark.parametrize(
    ("stages", "fragment"),
    [
        ([GapDistillStage()], "needs one of prune, merge before it"),
        ([PruneStage(num_layers=1), GapDistillStage(steps=0)], "steps 0 must be >= 1"),
        ([PruneStage(num_layers=1), GapDistillStage(lr=0.0)], "lr 0.0 must be a finite number > 0"),
        ([PruneStage(num_layers=1), GapDistillStage(loss="l2")], "choose one of kl_raw, kl_norm, mse_norm, cosine"),
        ([PruneStage(num_layers=1), GapDistillStage(layers_after=0)], "train at least one layer"),
        (
            [PruneStage(num_layers=1), SparsifyStage(method="magnitude", allocation="uniform", sparsity=0.5), GapDistillStage()],
            "after sparsify",
        ),
    ],
)
def test_bad_settings_are_refused(stages, fragment):
    with pytest.raises(InputError, match=fragment):
        check_stages(stages, make_tiny_model("llama").config)


def test_cli_refuses_bad_loss_in_one_line(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "fit",
        "--model=lightning_prune.modules.healing.HealingModule",
        f"--model.model={tiny_dir}",
        "--data=lightning_prune.data.datamodule.TextDataModule",
        f"--run_dir={tmp_path / 'run'}",
        "--stages=[prune,distill_gap]",
        "--prune.num_layers=1",
        "--distill_gap.loss=l2",
    )
    assert_one_line_error(code, err, "choose one of kl_raw")
    assert not (tmp_path / "run" / "decisions.json").exists()


def test_fit_prune_gap_then_teacher_lora_saves_what_plain_transformers_loads(tiny_dir, tmp_path):
    from test_compositions import assert_saved_equals_live, fit

    module = HealingModule(
        model=str(tiny_dir), lora_dropout=0.0, learning_rate=1e-2, warmup_steps=1, target_modules=["q_proj", "down_proj"], distill={}
    )
    callback = fit(tiny_dir, tmp_path, module, [PruneStage(num_layers=2, compensation="magnitude"), GapDistillStage(steps=5)])
    assert [d.kind for d in callback.decisions] == ["prune", "distill_gap"]
    assert callback.decisions[1].record["windows"]
    assert_saved_equals_live(tmp_path, callback, module, layers=4)
    plan = json.loads((tmp_path / "decisions.json").read_text())
    assert [d["kind"] for d in plan["decisions"]] == ["prune", "distill_gap"]
    assert (tmp_path / "decisions.safetensors").is_file()


class ThreadRanks:
    """``reduce`` for ranks run as threads in lockstep: each call returns the sum over ranks."""

    def __init__(self, world: int):
        import threading

        self.barrier, self.slots, self.world = threading.Barrier(world), [None] * world, world

    def reduce_for(self, rank: int):
        def reduce(tensor):
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total

        return reduce


def test_rank_shards_with_summed_gradients_equal_one_process():
    import threading

    dense = make_tiny_model("llama")
    blocks = random_ids(8, 16, seed=6)
    shards = [blocks[0::2], blocks[1::2]]  # what StageCallback gives each of 2 ranks
    settings = dict(steps=6, lr=3e-3)

    def gap_weights(model, stage, data, reduce):
        stage.observe(model, data)
        prune = PruneStage(layers=[2]).plan(model, None, progress=False)
        stage.follow([prune])
        return stage.plan(model, data, reduce=reduce, progress=False).tensors()

    ranks, results = ThreadRanks(2), [None, None]

    def rank(r):
        results[r] = gap_weights(copy.deepcopy(dense), GapDistillStage(batch_size=2, **settings), shards[r], ranks.reduce_for(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # one process, batches of 4 = rank 0's batch of 2 and rank 1's batch of 2, in the same order
    joined = torch.cat([shards[0][:2], shards[1][:2], shards[0][2:], shards[1][2:]])
    single = gap_weights(copy.deepcopy(dense), GapDistillStage(batch_size=4, **settings), joined, lambda t: t)
    assert results[0].keys() == single.keys() and any(k.startswith("layers.2.") for k in single)
    for key, value in single.items():
        assert torch.equal(results[0][key], results[1][key]), key  # every rank took the same steps
        torch.testing.assert_close(results[0][key], value, rtol=0, atol=1e-5)


def test_recipe_plans_prune_then_gap_distillation(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "fit", "--config", "prune_gap_heal", "--run_dir", out, "--model.init_args.model", tiny_dir,
        "--prune.num_layers", "2", "--distill_gap.steps", "3", "--data.init_args.seq_len", "32",
        "--data.init_args.calibration_samples", "4", "--dry_run", "true",
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads((out / "decisions.json").read_text())
    assert [d["kind"] for d in plan["decisions"]] == ["prune", "distill_gap"]
    gap = plan["decisions"][1]
    assert gap["settings"]["loss"] == "mse_norm" and gap["settings"]["layers_after"] == 1 and gap["windows"]
    assert "distill_gap: trained layers" in stdout
