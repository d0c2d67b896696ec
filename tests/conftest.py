"""Tiny random models, one per supported family, a tiny tokenizer trained offline, and process helpers."""

import os
import signal
import subprocess
import sys

import lightning  # noqa: F401  (imported before any test captures output: its log handler keeps the real stream)
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from lightning_prune.cli import main
from lightning_prune.data.text import corpus_file

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "llama_tied": lambda: LlamaConfig(**{**_COMMON, "tie_word_embeddings": True}),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen2_sliding": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=3),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        tie_word_embeddings=False,
        dropout=0.0,
    ),
}
FAMILY_NAMES = [name for name in TINY_CONFIGS if name != "llama_tied"]

# Set by Lightning's launcher in the process that launches (also a one-device FSDP/DDP run that then
# fails); a process started with LOCAL_RANK believes it is a launched rank and starts no others.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Whatever a test (or the library code it runs in-process) sets in os.environ is undone after it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def launch(command: list, timeout: int = 300, **env) -> str:
    """Run a script that starts its own ranks; return its stderr, failing the test on a non-zero exit or a timeout.

    The environment is this one without distributed launch variables, plus ``env`` (one OpenMP
    thread per rank unless given). The script runs in its own process group, so a timeout also
    ends the ranks Lightning's launcher started instead of leaving them waiting.
    """
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    environment.update({"OMP_NUM_THREADS": "1", **env})
    process = subprocess.Popen(
        [sys.executable, *map(str, command)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{command[0]} did not finish in {timeout} s:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def make_tiny_model(name: str, seed: int = 0):
    """A randomly initialised tiny causal LM of the named family, in eval mode, fp32."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(params=FAMILY_NAMES)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with VOCAB entries trained on a slice of WikiText-2 valid."""
    text = corpus_file("wikitext2", "validation").read_text(encoding="utf-8")[:200_000]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer=trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    fast.model_max_length = 256
    return fast


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama saved as a local Hugging Face directory with its tokenizer."""
    model = make_tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def random_ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def run_cli(capsys, *args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_decision(run_dir, kind: str) -> dict:
    """The ``kind`` decision (prune, merge, sparsify) of a run directory's decisions.json."""
    import json
    from pathlib import Path

    plan = json.loads((Path(run_dir) / "decisions.json").read_text())
    matches = [entry for entry in plan["decisions"] if entry["kind"] == kind]
    assert len(matches) == 1, plan
    return matches[0]


def assert_one_line_error(code, err, fragment):
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lightning-prune: error:")]
    assert len(errors) == 1 and fragment in errors[0], err
