"""``lightning-prune sparsify``: unstructured or N:M weight sparsity with uniform/OWL/DLP allocation.

Writes ``model/``, ``decisions.json`` (per-layer sparsity, statistics, N:M patterns),
``metrics.json`` (perplexity before/after, measured sparsity, time) and
``layer_sparsity.png`` (per-layer sparsity of the chosen allocation).
"""

import os
import tempfile
import time
from pathlib import Path

from lightning_prune.commands.common import EvaluationData, data_location, load_checked_model, run_record, split_names
from lightning_prune.data.text import load_blocks
from lightning_prune.results import RunDirectory
from lightning_prune.sparsity.allocation import check_allocation
from lightning_prune.sparsity.masks import measure_sparsity
from lightning_prune.model.loading import load_config
from lightning_prune.sparsity.nm import check_mixed, check_widths, parse_pattern, resolve_sparsity
from lightning_prune.sparsity.sequential import check_method
from lightning_prune.sparsity.sequential import sparsify as sparsify_model

__all__ = ["sparsify", "plot_layer_sparsity"]

PLOT_NAME = "layer_sparsity.png"


def plot_layer_sparsity(path: Path, layer_sparsity: list[float], target: float, title: str) -> Path:
    """Bar chart of per-layer sparsity with the target as a line, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.bar(range(len(layer_sparsity)), layer_sparsity, color="tab:blue")
    axis.axhline(target, color="tab:red", linestyle="--", label=f"target {target:g}")
    axis.set(xlabel="decoder layer", ylabel="sparsity", title=title, ylim=(0, 1))
    axis.legend(loc="lower right")
    figure.tight_layout()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def _decisions(result, **settings) -> dict:
    """``decisions.json``: the settings that decide, then per-layer sparsity, statistic and N:M pattern."""
    return {**settings, "layer_sparsity": result.layer_sparsity, "layer_statistic": result.layer_statistic,
            "layer_patterns": result.layer_patterns}


def sparsify(
    model: str = "demo",
    method: str = "wanda",
    allocation: str = "dlp",
    sparsity: float | None = None,
    alpha: float | None = None,
    structure: str = "",
    data: str = "c4",
    calibration_samples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    eval_data: str = "wikitext2",
    eval_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    output_dir: str = "runs/sparsify",
    overwrite: bool = False,
) -> dict:
    """Prune the decoder's projection weights to a sparsity, allocated per layer (uniform, OWL or DLP).

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        method: magnitude, wanda or sparsegpt.
        allocation: uniform, owl or dlp (per-layer sparsity; 003 Eq. 5-6 for dlp).
        sparsity: fraction of weights to prune in [0, 1) (default 0.5; with --structure it is 1 - N/M).
        alpha: DLP alpha / OWL lambda in (0, 0.5] (default: dlp 0.15, owl 0.08).
        structure: N:M pattern such as 2:4 or 4:8 (N kept of every M); mixed N:M with owl/dlp.
        data: calibration source (c4, wikitext2, text/jsonl path), validation split.
        calibration_samples: calibration blocks.
        seq_len: tokens per calibration and evaluation block.
        seed: seed for drawing the calibration blocks.
        eval_data: comma-separated perplexity sources (test split).
        eval_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        dtype: float32, bfloat16 or float16.
        device: e.g. cpu, cuda.
        output_dir: run directory for model/, decisions.json, metrics.json and the PNG.
        overwrite: replace results already in output_dir.
    """
    settings = dict(locals())
    run = RunDirectory(output_dir, overwrite)
    run.check()
    check_method(method)
    pattern = parse_pattern(structure)
    target = resolve_sparsity(sparsity, pattern)
    alpha = check_allocation(allocation, target, alpha)
    if pattern:
        check_widths(load_config(model), pattern)
        if allocation != "uniform":
            check_mixed(pattern)
    sources = split_names(eval_data)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len, data=[*sources, data])
    evaluation = EvaluationData(tokenizer, sources, seq_len=seq_len, num_samples=eval_samples)
    blocks = load_blocks(tokenizer, data, split="validation", seq_len=seq_len, num_samples=calibration_samples, seed=seed)
    settings.update(alpha=alpha, sparsity=target, data_files=evaluation.files, calibration_file=data_location(data, "validation"))
    before = evaluation.evaluate(lm, batch_size=batch_size)
    start = time.perf_counter()
    result = sparsify_model(
        lm, blocks, method=method, allocation=allocation, sparsity=target, alpha=alpha, pattern=pattern, batch_size=batch_size
    )
    seconds = time.perf_counter() - start
    measured = measure_sparsity(lm)
    after = evaluation.evaluate(lm, batch_size=batch_size)
    decisions = _decisions(result, method=method, allocation=allocation, target_sparsity=target, alpha=alpha,
                           structure=str(pattern) if pattern else None)
    run.save_model(lm, tokenizer)
    run.write_json("decisions.json", decisions)
    run.write_config(settings)
    plot_layer_sparsity(run.path / PLOT_NAME, result.layer_sparsity, target, f"{method} + {allocation} (alpha={alpha})")
    record = run_record(settings, before=before, after=after, measured_sparsity=measured, sparsify_seconds=seconds)
    run.write_json("metrics.json", record)
    return {**record, "decisions": decisions}
