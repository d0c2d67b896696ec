"""``lightning-prune relevance``: accuracy-based layer relevance per task and on a mixed set (002 §4-5)."""

import math

import torch

from lightning_prune.commands.common import check_seq_len, load_checked_model, run_record, split_names
from lightning_prune.commands.score import check_fresh
from lightning_prune.data.tasks import chance_accuracy, encode_items, load_task, task_text
from lightning_prune.data.text import token_blocks, tokenize_text
from lightning_prune.errors import InputError
from lightning_prune.evaluation.plots import relevance_heatmap
from lightning_prune.importance import ScoringOptions
from lightning_prune.importance.accuracy import accuracy, accuracy_data, full_accuracy
from lightning_prune.importance.block_influence import block_influence
from lightning_prune.model.loading import load_config
from lightning_prune.results import RunDirectory

__all__ = ["relevance"]

MIXED = "mixed"


def _values(scores: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in scores.tolist()]


def _task_scores(lm, tokenizer, items, *, seq_len: int, options: ScoringOptions) -> dict:
    """Accuracy relevance (acc_norm, Eq. 3) and cosine BI on the same items."""
    encoded = encode_items(tokenizer, items)
    full = full_accuracy(lm, accuracy_data(encoded, 1), options)
    ids = tokenize_text(tokenizer, task_text(items))
    length = min(seq_len, ids.numel())
    blocks = token_blocks(ids, length, max(1, min(len(items), ids.numel() // length)), source="task text")
    record = {
        "items": len(items),
        "acc_norm": full,
        "chance": chance_accuracy(items),
        "block_influence": _values(block_influence(lm, blocks, options)),
    }
    try:
        record["accuracy_relevance"] = _values(accuracy(lm, encoded, options))
    except InputError as error:
        record["accuracy_relevance"], record["skipped"] = [None] * lm.config.num_hidden_layers, str(error)
    return record


def relevance(
    model: str = "demo",
    tasks: str = "arc_easy,piqa,boolq",
    calibration_samples: int = 64,
    mixed: bool = True,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    output_dir: str = "runs/relevance",
    overwrite: bool = False,
) -> dict:
    """Per-layer accuracy relevance per task (task-dependent) and on all tasks mixed (task-independent).

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        tasks: comma-separated tasks: arc_easy, piqa, boolq or multiple-choice jsonl files.
        calibration_samples: first items taken from each task.
        mixed: also score the union of the tasks' items (task-independent relevance).
        seq_len: tokens per block for the cosine block-influence comparison.
        batch_size: blocks per forward pass (cosine BI).
        seed: recorded for completeness (the items are the first calibration_samples, no random draw).
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
        output_dir: run directory for relevance.json and relevance.png.
        overwrite: replace results already in output_dir.
    """
    settings = dict(locals())
    names = split_names(tasks)
    if not names:
        raise InputError("--tasks names no task; pass e.g. arc_easy,piqa,boolq")
    if calibration_samples <= 0:
        raise InputError(f"calibration_samples must be positive, got {calibration_samples}")
    run = RunDirectory(output_dir, overwrite)
    check_fresh(run, "relevance.json")
    check_seq_len(seq_len, load_config(model))
    items = {name: load_task(name, limit=calibration_samples) for name in names}
    if mixed and len(names) > 1:
        items[MIXED] = [item for name in names for item in items[name]]
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len)
    options = ScoringOptions(batch_size=batch_size, seed=seed)
    results = {name: _task_scores(lm, tokenizer, task_items, seq_len=seq_len, options=options) for name, task_items in items.items()}
    record = run_record(
        settings,
        metric_definitions={
            "accuracy": "acc_norm (lm-eval loglikelihood / choice length in characters)",
            "relevance": "002 Eq. 3",
            "block_influence": "1 - mean token cosine",
        },
        tasks=results,
    )
    run.write_json("relevance.json", record)
    panels = {key: {name: result[key] for name, result in results.items()} for key in ("accuracy_relevance", "block_influence")}
    relevance_heatmap(panels, run.path / "relevance.png", title=f"layer relevance ({model})")
    return record
