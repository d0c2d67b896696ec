"""``lightning-prune score``: one importance score per decoder layer, as JSON and a bar plot."""

import math

import torch

from lightning_prune.commands.common import check_seq_len, data_location, load_checked_model, run_record
from lightning_prune.data.tasks import encode_items, is_task, load_task, task_text
from lightning_prune.data.text import data_key, load_blocks, token_blocks, tokenize_text
from lightning_prune.errors import InputError
from lightning_prune.evaluation.plots import score_bars
from lightning_prune.importance import ScoringOptions, metric_name, score_layers
from lightning_prune.model.loading import load_config
from lightning_prune.onload import finish_onload
from lightning_prune.results import RunDirectory

__all__ = ["score", "load_scoring_data", "check_fresh"]


def load_scoring_data(tokenizer, source: str, metric: str, *, seq_len: int, num_samples: int, seed: int):
    """(scoring data, calibration blocks): blocks (N, seq_len) from a text source (validation split,
    seeded draw), or for a multiple-choice task its first ``num_samples`` items (encoded for
    ``accuracy``) and blocks cut from the items' text."""
    if not is_task(source):
        blocks = load_blocks(
            tokenizer, source, split="validation", seq_len=seq_len, num_samples=num_samples, seed=seed, option="calibration_samples"
        )
        return blocks, blocks
    items = load_task(source, limit=num_samples)
    ids = tokenize_text(tokenizer, task_text(items))
    available = max(1, min(num_samples, ids.numel() // seq_len))
    blocks = token_blocks(ids, seq_len, available, seed=seed, source=repr(source))
    return (encode_items(tokenizer, items) if metric == "accuracy" else blocks), blocks


def check_fresh(run: RunDirectory, name: str) -> None:
    """Refuse (before any work) to replace an existing ``name`` in the run directory unless overwriting."""
    run.check()
    if (run.path / name).exists() and not run.overwrite:
        raise InputError(f"output_dir {str(run.path)!r} already holds {name}; choose another directory or pass --overwrite")


def _finite(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def score(
    model: str = "demo",
    metric: str = "block_influence",
    calibration_data: str = "wikitext2",
    calibration_samples: int = 64,
    seq_len: int = 128,
    block_size: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    output_dir: str = "runs/score",
    overwrite: bool = False,
    onload: str = "none",
    offload_dir: str | None = None,
    max_device_memory: str | None = None,
) -> dict:
    """Score every decoder layer with one importance metric (higher = more important).

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        metric: magnitude, taylor, block_influence (bi), contiguous (cl), removal_perplexity (ppl), gradient, accuracy or random.
        calibration_data: wikitext2 / c4 (validation split), a text/jsonl file, or a task (arc_easy, piqa, boolq, task jsonl).
        calibration_samples: calibration blocks (or task items).
        seq_len: tokens per calibration block.
        block_size: layers per block for the contiguous metric.
        batch_size: blocks per forward pass.
        seed: seed of the calibration draw and of the random metric.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
        output_dir: run directory for scores.json and scores.png.
        overwrite: replace results already in output_dir.
        onload: none (the whole model on the device) or layer (decoder layers stay in host memory, or in
            offload_dir, and run on the device one at a time: device memory ~ one layer + embeddings and head).
        offload_dir: with onload layer, keep the layers in memory-mapped safetensors files under this
            directory instead of host memory (a local safetensors checkpoint is read from its own files).
        max_device_memory: refuse to start when what goes on the device does not fit (e.g. 24GiB; default: unchecked).
    """
    settings = dict(locals())
    metric = metric_name(metric)
    run = RunDirectory(output_dir, overwrite)
    check_fresh(run, "scores.json")
    check_seq_len(seq_len, load_config(model))
    lm, tokenizer = load_checked_model(
        model,
        dtype=dtype,
        device=device,
        seq_len=seq_len,
        data=[calibration_data],
        onload=onload,
        offload_dir=offload_dir,
        max_device_memory=max_device_memory,
    )
    try:
        data, _ = load_scoring_data(tokenizer, calibration_data, metric, seq_len=seq_len, num_samples=calibration_samples, seed=seed)
        options = ScoringOptions(batch_size=batch_size, seed=seed, block_size=block_size)
        scores = _finite(score_layers(lm, data, metric, options))
    finally:
        finish_onload(lm)
    settings["calibration_file"] = calibration_data if is_task(calibration_data) else data_location(calibration_data, "validation")
    record = run_record(settings, metric=metric, higher_is_more_important=True, data=data_key(calibration_data), scores=scores)
    run.write_json("scores.json", record)
    score_bars(scores, run.path / "scores.png", title=f"{metric} ({model})", ylabel="score")
    return record
