"""``lightning-prune prune``: remove decoder layers (given, or chosen by a metric), optionally compensate,
save the model, report perplexity before/after."""

import time

from lightning_prune.commands.common import EvaluationData, check_seq_len, load_checked_model, parse_indices, run_record, split_names
from lightning_prune.commands.score import load_scoring_data
from lightning_prune.data.tasks import is_task
from lightning_prune.compensation import make_compensation
from lightning_prune.errors import InputError
from lightning_prune.importance import ScoringOptions, metric_name
from lightning_prune.model.loading import load_config
from lightning_prune.model.surgery import validate_layer_indices
from lightning_prune.pruning import prune_layers, resolve_protection
from lightning_prune.results import RunDirectory
from lightning_prune.selection import check_selection, protected_positions, removal_count

__all__ = ["prune"]


def _check_target(config, layers: str, num_layers: int | None, ratio: float | None, metric: str, protect: tuple) -> list[int] | None:
    """Exactly one of layers / num_layers / ratio, valid for the model's depth (checked before loading weights)."""
    given = [name for name, value in (("layers", layers), ("num_layers", num_layers), ("ratio", ratio)) if value not in ("", None)]
    if len(given) != 1:
        raise InputError(f"give exactly one of --layers, --num_layers or --ratio (got {', '.join(given) or 'none'})")
    depth = config.num_hidden_layers
    if layers:
        return validate_layer_indices(parse_indices(layers), depth)
    first, last = resolve_protection(metric, *protect)
    removal_count(depth, count=num_layers, ratio=ratio, protected=len(protected_positions(depth, first, last)))
    return None


def prune(
    model: str = "demo",
    layers: str = "",
    metric: str = "block_influence",
    selection: str = "one_shot",
    num_layers: int | None = None,
    ratio: float | None = None,
    compensation: str = "none",
    calibration_data: str = "wikitext2",
    calibration_samples: int = 64,
    protect_first: int | None = None,
    protect_last: int | None = None,
    seed: int = 0,
    data: str = "wikitext2",
    seq_len: int = 128,
    num_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    output_dir: str = "runs/prune",
    overwrite: bool = False,
) -> dict:
    """Remove decoder layers (given, or chosen by an importance metric) and save the smaller model.

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        layers: comma-separated original indices to remove, e.g. 12,13 (instead of num_layers / ratio).
        metric: magnitude, taylor, block_influence (bi), contiguous (cl), removal_perplexity (ppl), gradient, accuracy or random.
        selection: one_shot, iterative (re-score after every removal) or contiguous (one block).
        num_layers: how many layers to remove.
        ratio: fraction of the layers to remove, in (0, 1).
        compensation: none, magnitude (Prune&Comp MagComp) or projection (GradMAP stage 2).
        calibration_data: wikitext2 / c4 (validation split), a text/jsonl file, or a task (arc_easy, piqa, boolq).
        calibration_samples: calibration blocks of seq_len tokens (or task items), drawn with seed.
        protect_first: first layers never removed (default: 4 for magnitude/taylor, else 1).
        protect_last: last layers never removed (default: 2 for magnitude/taylor, else 1).
        seed: seed of the calibration draw and of the random metric.
        data: comma-separated evaluation sources (wikitext2, c4, text/jsonl paths), test split.
        seq_len: tokens per calibration and evaluation block.
        num_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        dtype: float32, bfloat16 or float16.
        device: e.g. cpu, cuda.
        output_dir: run directory for model/, decisions.json and metrics.json.
        overwrite: replace results already in output_dir.
    """
    settings = dict(locals())
    run = RunDirectory(output_dir, overwrite)
    run.check()
    metric, selection = metric_name(metric), check_selection(selection)
    make_compensation(compensation)
    config = load_config(model)
    check_seq_len(seq_len, config)
    explicit = _check_target(config, layers, num_layers, ratio, metric, (protect_first, protect_last))
    sources = split_names(data)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len, data=[*sources, calibration_data])
    make_compensation(compensation).check(lm)
    evaluation = EvaluationData(tokenizer, sources, seq_len=seq_len, num_samples=num_samples)
    scoring = blocks = None
    if explicit is None or compensation != "none":
        scoring, blocks = load_scoring_data(tokenizer, calibration_data, metric, seq_len=seq_len, num_samples=calibration_samples, seed=seed)
    settings["data_files"] = evaluation.files
    settings["calibration_kind"] = "task" if is_task(calibration_data) else "text (validation split)"
    before = evaluation.evaluate(lm, batch_size=batch_size)
    start = time.perf_counter()
    decisions = prune_layers(
        lm, scoring, metric=metric, selection=selection, num_layers=num_layers, ratio=ratio, compensation=compensation,
        protect=(protect_first, protect_last), layers=explicit, calibration_blocks=blocks,
        options=ScoringOptions(batch_size=batch_size, seed=seed),
    )
    seconds = time.perf_counter() - start
    after = evaluation.evaluate(lm, batch_size=batch_size)
    run.save_model(lm, tokenizer)
    run.write_json("decisions.json", decisions)
    run.write_config(settings)
    record = run_record(settings, before=before, after=after, pruning_seconds=seconds)
    run.write_json("metrics.json", record)
    return {**record, "decisions": decisions}
