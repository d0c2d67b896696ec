"""The bad-input contract over every subcommand and a recipe: exit code 2, one stderr line, no traceback, nothing written.

The cases are a table: bad values per option family (model sources, numbers, devices, data
files, task names, output locations, checkpoints, recipe syntax), crossed with every command
that has the option. Each runs the CLI in-process on a tiny model; none loads weights.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, make_tiny_model, run_cli

from lightning_prune.commands import COMMANDS
from lightning_prune.run_state import MARKER

TINY = "tiny"
# command -> the smallest valid arguments (without --output_dir)
BASE = {
    "evaluate": ["--model", TINY, "--seq_len", 32, "--eval_samples", 2],
    "prune": ["--model", TINY, "--layers", 1, "--seq_len", 32, "--eval_samples", 2],
    "merge": ["--model", TINY, "--num_layers", 1, "--seq_len", 32, "--eval_samples", 2, "--calibration_samples", 2],
    "sparsify": ["--model", TINY, "--sparsity", 0.5, "--seq_len", 32, "--eval_samples", 2, "--calibration_samples", 2],
    "apply": ["--plan", "plan/decisions.json", "--model", TINY],
    "score": ["--model", TINY, "--metric", "bi", "--seq_len", 32, "--calibration_samples", 2],
    "relevance": ["--model", TINY, "--tasks", "arc_easy", "--calibration_samples", 2, "--seq_len", 32],
    "demo": ["--model", TINY],
    "generate": ["--prompt", "Once", "--model", TINY],
    "chat": ["--model", TINY],
}
# option -> [(bad value, fragment of the one error line)]; paths are relative to the world directory
BAD_VALUES = {
    "model": [
        ("./missing-model", "does not exist"),
        ("no-weights", "has a config.json but no weights"),
        ("truncated", "is truncated"),
        ("broken-header", "corrupt"),
        ("wrong-type-config", "invalid config.json"),
        ("not-json-config", "config.json is not valid JSON"),
        ("missing-shard", "is missing the shard model-00002-of-00002.safetensors"),
        ("bad-bin", "is not a PyTorch weight archive"),
        ("notes.txt", "is not a .gguf file"),
        ("fake.gguf", "is not a GGUF file"),
        ("someone/some-model", "the Hub cannot be reached"),
    ],
    "batch_size": [(0, "--batch_size must be >= 1, got 0"), (-4, "--batch_size must be >= 1, got -4")],
    "seq_len": [(1, "--seq_len must be >= 2, got 1"), (0, "--seq_len must be >= 2, got 0")],
    "eval_samples": [(0, "--eval_samples must be >= 1, got 0")],
    "calibration_samples": [(0, "--calibration_samples must be >= 1, got 0"), (-1, "--calibration_samples must be >= 1, got -1")],
    "block_size": [(0, "--block_size must be >= 1, got 0")],
    "num_layers": [(0, "must be in 1..")],
    "heal_steps": [(0, "--heal_steps must be >= 1, got 0"), (-2, "--heal_steps must be >= 1, got -2")],
    "max_new_tokens": [(0, "--max_new_tokens must be >= 1, got 0")],
    "temperature": [(-0.5, "temperature must be >= 0")],
    "top_p": [(0, "--top_p must be in (0, 1], got 0"), (1.5, "--top_p must be in (0, 1], got 1.5")],
    "device": [("foo", "is not a device"), ("cuda:99", "is not available here")],
    "dtype": [("int8", "is not supported")],
    "eval_data": [
        ("latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
        ("binary.txt", "is binary"),
        ("null-text.jsonl", "null-text.jsonl:2 has 'text' = None"),
        ("number-text.jsonl", "number-text.jsonl:1 has 'text' = 5"),
        ("late-latin1.txt", "at offset 70000"),
        ("missing.txt", "does not exist"),
        ("empty.txt", "is empty"),
        ("folder", "is a directory"),
    ],
    "tasks": [("../x", "is not a task name"), ("/abs/path", "is not a task name")],
    "plan": [("missing.json", "does not exist"), ("notes.txt", "is not valid JSON")],
    "output_dir": [("a-file/run", "is a file, not a directory"), ("a-file", "is a file; pass a directory")],
    "projection_solver": [
        ("newton", "--projection_solver 'newton' is not known; choose one of closed_form, adam"),
        ("adam", "--projection_solver adam applies only to --compensation projection (got --compensation none)"),
    ],
    "onload": [("layers", "onload 'layers' is not known; choose one of none, layer")],
    "offload_dir": [("offload", "keeps onloaded layers on disk; it needs onload layer")],
    "max_device_memory": [("5XB", "max_device_memory '5XB' is not a size"), ("1KB", "cannot hold the whole model")],
}
BAD_VALUES["calibration_data"] = BAD_VALUES["eval_data"][:5]
# (command, option) -> the base option the bad one replaces (prune takes one of --layers, --num_layers, --ratio)
REPLACES = {("prune", "num_layers"): "layers"}
# where a command takes task files rather than names, a path is a file that must exist
RELEVANCE_TASKS = [("../x", "nor a jsonl file"), ("latin1.jsonl", "is not UTF-8 text")]


def command_options(name: str) -> set[str]:
    """The option names of a subcommand (its parameters, dataclass parameters flattened)."""
    import dataclasses
    import inspect
    import typing

    function = COMMANDS[name]
    hints = typing.get_type_hints(function)
    names = set()
    for parameter in inspect.signature(function).parameters:
        kind = hints.get(parameter)
        names |= {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {parameter}
    return names


def command_cases():
    cases = []
    for command in COMMANDS:
        options = command_options(command)
        for option, values in BAD_VALUES.items():
            if option not in options:
                continue
            if command == "relevance" and option == "tasks":
                values = RELEVANCE_TASKS
            for value, fragment in values:
                cases.append(pytest.param(command, option, value, fragment, id=f"{command}-{option}-{value}"))
    return cases


def _write_bad_models(world: Path) -> None:
    good = world / TINY
    model = make_tiny_model("llama")
    model.save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    weights = (good / "model.safetensors").read_bytes()
    for name in ("no-weights", "truncated", "broken-header", "wrong-type-config", "not-json-config", "missing-shard", "bad-bin"):
        (world / name).mkdir()
        (world / name / "config.json").write_text(json.dumps(config))
    (world / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (world / "broken-header" / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31 + weights[-100:])
    (world / "wrong-type-config" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "six"}))
    (world / "wrong-type-config" / "model.safetensors").write_bytes(weights)
    (world / "not-json-config" / "config.json").write_text("{model_type: llama")
    (world / "not-json-config" / "model.safetensors").write_bytes(weights)
    shards = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}
    (world / "missing-shard" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (world / "missing-shard" / "model-00001-of-00002.safetensors").write_bytes(weights)
    (world / "bad-bin" / "pytorch_model.bin").write_bytes(b"not a zip archive")
    (world / "notes.txt").write_text("not a model")
    (world / "fake.gguf").write_bytes(b"NOPE" + bytes(60))


def _write_bad_data(world: Path) -> None:
    (world / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (world / "latin1.jsonl").write_bytes('{"query": "caf\xe9", "choices": ["a"], "gold": 0}\n'.encode("latin-1"))
    (world / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (world / "null-text.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (world / "number-text.jsonl").write_text('{"text": 5}\n')
    (world / "late-latin1.txt").write_bytes(b"a" * 70000 + "é".encode("latin-1") + b"b" * 10)
    (world / "empty.txt").write_text("")
    (world / "folder").mkdir()
    (world / "a-file").write_text("keep me")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """A directory with a tiny model, bad model sources, bad data files and a plan for ``apply``."""
    world = tmp_path_factory.mktemp("bad-input")
    _write_bad_models(world)
    tiny_tokenizer.save_pretrained(world / TINY)
    _write_bad_data(world)
    (world / "plan").mkdir()
    layers = {"kind": "prune", "removed_layers": [1], "kept_layers": [0, 2, 3, 4, 5]}
    (world / "plan" / "decisions.json").write_text(json.dumps({"decisions": [layers]}))
    return world


@pytest.fixture(autouse=True)
def offline(monkeypatch, world):
    """No network: the Hub counts as unreachable, and the tests run inside the world directory."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(world)


def snapshot(world: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(world)): (path.stat().st_size, path.stat().st_mtime_ns) for path in world.rglob("*")}


def assert_contract(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("lightning-prune: error: "), err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(("command", "option", "value", "fragment"), command_cases())
def test_bad_command_input_is_one_line_and_writes_nothing(capsys, world, command, option, value, fragment):
    before = snapshot(world)
    args = [command, *BASE[command]]
    replaced = f"--{REPLACES.get((command, option), option)}"
    if replaced in args:  # the bad value replaces the base one
        position = args.index(replaced)
        args[position : position + 2] = []
    args += [f"--{option}", value]
    if option != "output_dir" and "output_dir" in command_options(command):
        args += ["--output_dir", "out"]
    code, _, err = run_cli(capsys, *args)
    assert_contract(code, err, fragment)
    assert snapshot(world) == before


RECIPE = [
    "fit",
    "--config",
    "prune_heal",
    "--model.init_args.model",
    TINY,
    "--run_dir",
    "run",
    "--prune.num_layers",
    2,
    "--data.init_args.seq_len",
    32,
    "--data.init_args.num_train_samples",
    8,
    "--data.init_args.calibration_samples",
    4,
    "--data.init_args.num_val_samples",
    2,
    "--evaluation.seq_len",
    32,
    "--evaluation.num_samples",
    2,
    "--trainer.max_steps",
    2,
    "--trainer.val_check_interval",
    2,
]
RECIPE_CASES = {
    "learning-rate": (["--model.init_args.learning_rate", -1], "--model.init_args.learning_rate must be > 0, got -1.0"),
    "zero-learning-rate": (["--model.init_args.learning_rate", 0], "learning_rate must be > 0, got 0.0"),
    "batch-size": (["--data.init_args.batch_size", 0], "--data.init_args.batch_size must be >= 1, got 0"),
    "seq-len": (["--data.init_args.seq_len", 1], "--data.init_args.seq_len must be >= 2, got 1"),
    "evaluation-samples": (["--evaluation.num_samples", 0], "--evaluation.num_samples must be >= 1, got 0"),
    "devices": (["--trainer.devices", 0], "--trainer.devices must be a positive number of devices, -1 (all) or auto, got 0"),
    "max-steps": (["--trainer.max_steps", 0], "--trainer.max_steps must be a positive number (or -1 for no limit), got 0"),
    "val-check-interval": (["--trainer.val_check_interval", 1000], "val_check_interval 1000 is more than the 2 training batches"),
    "val-check-interval-ddp": (  # the command line gives devices as a string; each of 2 ranks sees 1 of the 2 batches
        ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        "val_check_interval 2 is more than the 1 training batches",
    ),
    "accelerator": (["--trainer.accelerator", "tpu"], "--trainer.accelerator 'tpu' is not available here"),
    "strategy": (["--trainer.strategy", "nostrategy"], "--trainer.strategy 'nostrategy' is not a strategy"),
    "model": (["--model.init_args.model", "truncated"], "is truncated"),
    "train-data": (["--data.init_args.train_data", "latin1.txt"], "is not UTF-8 text"),
    "evaluation-data": (["--evaluation.data", "wikitext2,binary.txt"], "is binary"),
    "null-text": (["--data.init_args.train_data", "null-text.jsonl"], "has 'text' = None"),
    "task-path": (["--evaluation.tasks", "../x"], "is not a task name"),
    "ckpt-missing": (["--ckpt_path", "missing.ckpt"], "does not exist"),
    "ckpt-not-checkpoint": (["--ckpt_path", "notes.txt"], "is not a checkpoint"),
    "ckpt-last-none": (["--ckpt_path", "last"], "no last.ckpt"),
    "run-dir": (["--run_dir", "a-file/run"], "is a file, not a directory"),
    "onload": (["--onload", "layers"], "onload 'layers' is not known"),
    "offload-dir": (["--onload", "layer", "--offload_dir", "a-file/x"], "--offload_dir 'a-file/x' cannot be created"),
    "wrong-type": (["--trainer.max_steps", "many"], "Expected a <class 'int'>. Got value: many"),
    "unknown-key": (["--prune.num_layer", 3], "unrecognized arguments"),
    "yaml-syntax": (["--config", "broken.yaml"], "Problems parsing config"),
    "missing-config": (["--config", "nowhere.yaml"], "is neither a file nor a shipped recipe"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_input_is_one_line_and_writes_nothing(capsys, world, case):
    (world / "broken.yaml").write_text("stages: [prune\nprune: {num_layers: 1}\n")
    before = snapshot(world)
    extra, fragment = RECIPE_CASES[case]
    code, _, err = run_cli(capsys, *RECIPE, *extra)
    assert_contract(code, err, fragment)
    assert snapshot(world) == before
    assert not Path("lightning_logs").exists()


def test_good_sources_pass_the_data_checks(world):
    from lightning_prune.validation.preflight import check_data_source

    (world / "mine.jsonl").write_text('{"query": "2 + 2 =", "choices": ["4", "5"], "gold": 0}\n')
    (world / "story.jsonl").write_text('{"text": "Once upon a time."}\n')
    for source in ("wikitext2", "c4", "arc_easy", "piqa", "boolq", "mine.jsonl", "story.jsonl"):
        check_data_source(source, "calibration_data")


def test_verbose_prints_the_detail_before_the_one_line(capsys, world, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PRUNE_VERBOSE", "0")  # restored afterwards, though --verbose sets it
    code, _, err = run_cli(capsys, "evaluate", "--model", "truncated", "--verbose")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("lightning-prune: error: ")


def test_a_recipe_that_fails_after_it_started_leaves_no_run_directory(capsys, world):
    (world / "short.txt").write_text("A short story about a tiny model. " * 40)
    flags = ["--data.init_args.train_data", "short.txt", "--data.init_args.calibration_samples", 100000, "--evaluate", "false"]
    code, _, err = run_cli(capsys, *RECIPE, *flags)
    assert code == 2 and "data.init_args.calibration_samples=100000 is more than" in err
    assert not Path("run").exists()


def test_trust_remote_code_stays_off(capsys, world):
    """A model directory that names custom code is refused, and the code never runs."""
    custom = world / "custom"
    custom.mkdir(exist_ok=True)
    (custom / "config.json").write_text(json.dumps({"model_type": "custom_x", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (custom / "configuration_x.py").write_text("import pathlib; pathlib.Path('ran').write_text('code ran')\n")
    (custom / "model.safetensors").write_bytes((world / TINY / "model.safetensors").read_bytes())
    code, _, err = run_cli(capsys, "evaluate", "--model", custom)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (world / "ran").exists() and not (custom / "ran").exists()


def test_every_torch_load_reads_data_only():
    """No ``torch.load`` in the package, callbacks, benchmarks or tests without ``weights_only=True``."""
    root = Path(__file__).parents[1]
    calls = []
    for folder in ("lightning_prune", "callbacks", "configs", "benchmarks", "tests"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line and path != Path(__file__):
                    calls.append(f"{path.relative_to(root)}:{number}")
    assert calls == []


def _prune_command(world: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_prune.cli", "prune", *map(str, BASE["prune"]), "--output_dir", str(out)]


def _leftovers(out: Path) -> list[str]:
    return sorted(entry.name for entry in out.iterdir() if entry.name.startswith("."))


KILL_WHILE_SAVING = """
import os, signal, sys
import transformers
save = transformers.PreTrainedModel.save_pretrained
def save_then_die(self, directory, *args, **kwargs):
    save(self, directory, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
transformers.PreTrainedModel.save_pretrained = save_then_die
from lightning_prune.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("when", ["while-saving", "at-a-random-point"])
def test_a_killed_prune_is_cleaned_and_rerun_by_the_same_command(capsys, world, when):
    import random

    out = world / f"killed-{when}"
    command = _prune_command(world, out)
    if when == "while-saving":
        killed = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *command[3:]], capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert any(name.startswith(".model.") for name in _leftovers(out)) and (out / MARKER).exists()
    else:
        delay = random.uniform(0.5, 8.0)
        for _ in range(4):  # the kill must come before the run finishes; halve the delay until it does
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            os.kill(process.pid, signal.SIGKILL)
            if process.wait() == -signal.SIGKILL:
                break
            shutil.rmtree(out)
            delay /= 2
        assert process.returncode == -signal.SIGKILL
        if out.exists() and not (out / MARKER).exists() and (out / "metrics.json").exists():
            # killed after the run had finished its results: they are whole, so the same command
            # refuses to replace them (one line) and --overwrite replaces them
            code, _, err = run_cli(capsys, *command[3:])
            assert_one_line_error(code, err, "already holds results")
            command = [*command, "--overwrite"]
    code, _, err = run_cli(capsys, *command[3:])
    assert code == 0, err
    assert _leftovers(out) == []
    assert json.loads((out / "metrics.json").read_text())["after"]["num_layers"] == 5
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_fit_resumes_or_restarts_with_the_same_command(capsys, world):
    """SIGKILL a tiny prune_heal fit at a random point; the same command (plus --ckpt_path last if it saved one) finishes."""
    import random

    run = world / "killed-fit"
    args = [*RECIPE, "--run_dir", run, "--evaluate", "false", "--trainer.max_steps", 6, "--trainer.accumulate_grad_batches", 1]
    args += ["--trainer.enable_progress_bar", "false"]  # the recipe's ModelCheckpoint saves last.ckpt every 4 steps
    command = [sys.executable, "-m", "lightning_prune.cli", *map(str, args)]
    delay = random.uniform(2.0, 30.0)
    for _ in range(4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        if process.wait() == -signal.SIGKILL:
            break
        shutil.rmtree(run)
        delay /= 2
    resume = ["--ckpt_path", "last"] if (run / "checkpoints" / "last.ckpt").is_file() else []
    code, _, err = run_cli(capsys, *args, *resume)
    assert code == 0, err
    assert _leftovers(run) == []
    assert json.loads((run / "decisions.json").read_text())["decisions"][0]["kind"] == "prune"
    assert json.loads((run / "model" / "config.json").read_text())["num_hidden_layers"] == 4
