"""Layer-wise onloading: every calibration-driven stage decides exactly as with the whole model in memory.

Each case runs twice on the same tiny model of every family, once as it is and once with its
layers onloaded one at a time (host memory, and memory-mapped files in an offload directory),
and compares scores, picks, masks, merged weights and perplexities.
"""

import copy
import json

import pytest
import torch
from conftest import FAMILY_NAMES, make_tiny_model, random_ids, run_cli

from lightning_prune.errors import InputError
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.importance import ScoringOptions, score_layers
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.onload import LayerOnloader, active_onloader, check_onload, onloading
from lightning_prune.stages import MergeStage, PruneStage, SparsifyStage

BLOCKS = random_ids(8, 24, seed=5)
STORAGE = ["host", "disk"]


def onloaded_copy(model, storage, tmp_path):
    """A deep copy of ``model`` and the context that onloads it (host memory or files under tmp_path)."""
    twin = copy.deepcopy(model)
    return twin, onloading(twin, "cpu", offload_dir=str(tmp_path / "offload") if storage == "disk" else None)


def same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_scores_and_perplexity_equal_the_in_memory_model(family, storage, tmp_path):
    model = make_tiny_model(family)
    options = ScoringOptions(batch_size=4, progress=False)
    metrics = ["block_influence", "removal_perplexity", "gradient", "taylor", "magnitude", "sbi", "contiguous"]
    expected = {metric: score_layers(model, BLOCKS, metric, options) for metric in metrics}
    expected_ppl = perplexity(model, BLOCKS, batch_size=4, progress=False)
    twin, context = onloaded_copy(model, storage, tmp_path)
    with context as onloader:
        for metric in metrics:
            got = score_layers(twin, BLOCKS, metric, options)
            torch.testing.assert_close(got, expected[metric], rtol=1e-4, atol=1e-6, equal_nan=True, msg=metric)
        assert perplexity(twin, BLOCKS, batch_size=4, progress=False) == pytest.approx(expected_ppl, rel=1e-5)
        assert onloader.onloads >= Anatomy(twin).num_layers
    assert active_onloader(twin) is None
    assert all(t.device.type == "cpu" for t in twin.state_dict().values())
    same_weights(model, twin)  # scoring changed nothing


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize(
    "stage",
    [
        PruneStage(metric="block_influence", selection="iterative", num_layers=2, compensation="magnitude", batch_size=4),
        PruneStage(metric="removal_perplexity", num_layers=2, compensation="projection", batch_size=4),
        PruneStage(metric="gradient", num_layers=1, batch_size=4),
        MergeStage(num_layers=2, batch_size=4),
        MergeStage(num_layers=2, method="come_p", grid=4, batch_size=4),
        SparsifyStage(method="wanda", allocation="dlp", sparsity=0.5, batch_size=4),
        SparsifyStage(method="sparsegpt", allocation="owl", sparsity=0.6, batch_size=4),
        SparsifyStage(method="magnitude", allocation="uniform", sparsity=0.5, batch_size=4),
        SparsifyStage(method="wanda", allocation="uniform", structure="2:4", batch_size=4),
    ],
    ids=lambda stage: f"{stage.name}-{getattr(stage, 'metric', None) or stage.method}",
)
def test_stages_decide_and_change_the_model_as_in_memory(stage, storage, tmp_path):
    model = make_tiny_model("llama")
    expected = stage.plan(model, BLOCKS, progress=False)
    twin, context = onloaded_copy(make_tiny_model("llama"), storage, tmp_path)
    with context:
        got = stage.plan(twin, BLOCKS, progress=False)
    assert got.summary() == expected.summary()
    assert got.signature() == expected.signature()  # masks are in the signature of a sparsity decision
    assert Anatomy(twin).num_layers == Anatomy(model).num_layers
    same_weights(model, twin)


def test_one_layer_at_a_time_and_edits_made_on_the_device_come_home(tmp_path):
    model = make_tiny_model("llama")
    onloader = LayerOnloader(model, "cpu", offload_dir=str(tmp_path / "offload")).attach()
    layers = Anatomy(model).layers
    seen = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(onloader.current is module))
    model(input_ids=BLOCKS[:2])
    assert seen == [True] * len(layers) and onloader.current is layers[-1]
    written = onloader.writes
    onloader.use(layers[0])  # the last layer ran unchanged: it is not written again
    assert onloader.writes == written
    with torch.no_grad():
        layers[0].mlp.down_proj.weight.mul_(2)  # an edit made while the layer is on the device
        edited = layers[0].mlp.down_proj.weight.clone()
    onloader.settle()
    assert onloader.writes == written + 1 and onloader.current is None
    offload = next((tmp_path / "offload").iterdir())
    assert len(list(offload.glob("*.safetensors"))) == written + 1
    with torch.no_grad():
        layers[1].mlp.up_proj.weight.add_(1)  # an edit made while the layer is home (copy-on-write pages of a mapping)
        home_edit = layers[1].mlp.up_proj.weight.clone()
    onloader.use(layers[1])
    onloader.settle()  # the file no longer holds what the layer holds: written, not re-mapped
    assert onloader.writes == written + 2
    onloader.detach()
    assert not offload.exists()  # the files go with the onloader; the mapped tensors stay readable
    assert torch.equal(layers[0].mlp.down_proj.weight, edited)
    assert torch.equal(layers[1].mlp.up_proj.weight, home_edit)


def test_bad_onload_settings_are_refused():
    with pytest.raises(InputError, match="onload 'layers' is not known; choose one of none, layer"):
        check_onload("layers")
    with pytest.raises(InputError, match="offload_dir '/x' keeps onloaded layers on disk; it needs onload layer"):
        check_onload("none", "/x")
    model = make_tiny_model("llama")
    with onloading(model, "cpu"), pytest.raises(InputError, match="already onloaded"):
        LayerOnloader(model, "cpu").attach()


def saved_state(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model" / "model.safetensors"))


def test_prune_command_streams_the_checkpoint_and_saves_what_the_plain_run_saves(capsys, tiny_dir, tmp_path):
    common = ["prune", "--model", tiny_dir, "--metric", "bi", "--selection", "iterative", "--num_layers", 2]
    common += ["--compensation", "magnitude", "--calibration_samples", 4, "--eval_samples", 2, "--seq_len", 32, "--device", "cpu"]
    assert run_cli(capsys, *common, "--output_dir", tmp_path / "plain")[0] == 0
    offload = tmp_path / "offload"
    assert run_cli(capsys, *common, "--output_dir", tmp_path / "onload", "--onload", "layer", "--offload_dir", offload)[0] == 0
    plain, onloaded = saved_state(tmp_path / "plain"), saved_state(tmp_path / "onload")
    assert plain.keys() == onloaded.keys() and all(torch.equal(plain[k], onloaded[k]) for k in plain)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("plain", "onload")]
    assert metrics[0]["after"]["perplexity"] == metrics[1]["after"]["perplexity"]
    assert metrics[1]["settings"]["onload"] == "layer"
    assert list(offload.iterdir()) == []  # the layer files went with the run


def test_evaluate_with_onloaded_layers_measures_the_same_perplexity_and_task_scores(capsys, tiny_dir):
    args = ["evaluate", "--model", tiny_dir, "--eval_data", "wikitext2,c4", "--eval_samples", 2, "--seq_len", 32, "--json"]
    args += ["--tasks", "arc_easy,boolq", "--limit", 4]
    code, plain, _ = run_cli(capsys, *args)
    code_onload, onloaded, _ = run_cli(capsys, *args, "--onload", "layer")
    assert code == code_onload == 0
    plain, onloaded = json.loads(plain), json.loads(onloaded)
    assert plain["perplexity"] == onloaded["perplexity"]
    assert set(plain["tasks"]) == {"arc_easy", "boolq"} and plain["tasks"] == onloaded["tasks"]


@pytest.mark.parametrize("family", ["llama_tied", "opt"])
def test_streamed_checkpoint_in_another_dtype_gives_the_loaded_models_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_prune.model.loading import load_config
    from lightning_prune.model.streaming import load_streaming

    make_tiny_model(family).save_pretrained(tmp_path / "model")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16).eval()
    model, onloader = load_streaming(tmp_path / "model", load_config(str(tmp_path / "model")), torch.bfloat16, "cpu", str(tmp_path / "off"))
    assert onloader.writes == Anatomy(model).num_layers  # fp32 on disk: each layer converted and written once
    if family == "llama_tied":
        assert Anatomy(model).lm_head.weight is Anatomy(model).embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=BLOCKS[:2]).logits, expected(input_ids=BLOCKS[:2]).logits, rtol=0, atol=0)
    onloader.detach()


def test_a_device_budget_below_one_layer_names_what_a_layer_needs(tiny_dir):
    from lightning_prune.commands.common import load_checked_model

    layer = sum(p.numel() * 4 for p in Anatomy(make_tiny_model("llama")).layers[0].parameters())
    with pytest.raises(InputError, match=rf"cannot hold one decoder layer \({layer / 1024:.2f} KiB\) plus the embeddings"):
        load_checked_model(str(tiny_dir), dtype="float32", device="cpu", onload="layer", max_device_memory="100KB")


def test_stage_callback_plans_onloaded_and_trains_the_whole_model(tmp_path):
    from test_stage_callback import CalibrationData, TinyModule, trainer

    from lightning_prune.callbacks import StageCallback

    runs = {}
    for onload in ("none", "layer"):
        module = TinyModule()
        callback = StageCallback([PruneStage(metric="bi", selection="iterative", num_layers=2, batch_size=4)], onload=onload)
        trainer(tmp_path / onload, 2, callback).fit(module, datamodule=CalibrationData())
        runs[onload] = (callback.decisions[0].removed_layers, module)
        assert active_onloader(module.model) is None
    assert runs["none"][0] == runs["layer"][0]
    same_weights(runs["none"][1].model, runs["layer"][1].model)  # the same two SGD steps after the same decision


@pytest.mark.parametrize("storage", STORAGE)
def test_held_layers_train_together_as_in_memory(storage, tmp_path):
    from lightning_prune.capture import capture_layer_inputs, run_layers
    from lightning_prune.onload import holding

    def train(model):
        inputs = capture_layer_inputs(model, [BLOCKS[:2]], 1)
        layers = list(Anatomy(model).layers)[1:3]
        with holding(model, layers):
            parameters = [p for layer in layers for p in layer.parameters()]
            optimizer = torch.optim.SGD(parameters, lr=0.1)
            for _ in range(2):
                output = run_layers(model, inputs.hidden[0], inputs.kwargs[0], [1, 2])
                output.pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()

    model = make_tiny_model("qwen3")
    twin, context = onloaded_copy(model, storage, tmp_path)
    train(model)
    with context as onloader:
        train(twin)
        assert onloader.held == [] and onloader.current is None
    same_weights(model, twin)


@pytest.mark.parametrize("storage", STORAGE)
def test_prune_then_gap_distillation_trains_the_window_as_in_memory(storage, tmp_path):
    from lightning_prune.stages import GapDistillStage

    def run(model):
        stages = [PruneStage(layers=[2, 3]), GapDistillStage(layers_before=1, layers_after=1, steps=3, batch_size=4)]
        stages[1].observe(model, BLOCKS, progress=False)
        decisions = []
        for stage in stages:
            stage.follow(decisions)
            decisions.append(stage.plan(model, BLOCKS, progress=False))
        return decisions[1]

    model = make_tiny_model("llama")
    twin, context = onloaded_copy(model, storage, tmp_path)
    expected = run(model)
    with context:
        got = run(twin)
    for ours, theirs in zip(got.measurements()["gap_loss"], expected.measurements()["gap_loss"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)
    same_weights(model, twin)
