"""``lightning-prune sparsify``: unstructured or N:M weight sparsity with uniform/OWL/DLP allocation.

Writes ``model/``, ``decisions.json`` (per-layer sparsity, statistics, N:M patterns),
``metrics.json`` (perplexity before/after, measured sparsity, time) and
``layer_sparsity.png`` (per-layer sparsity of the chosen allocation).
"""

import os
import tempfile
from pathlib import Path

from lightning_prune.commands.staged import run_stage
from lightning_prune.evaluation.plots import pyplot
from lightning_prune.stages import SparsifyStage

__all__ = ["sparsify", "plot_layer_sparsity"]

PLOT_NAME = "layer_sparsity.png"


def plot_layer_sparsity(path: Path, layer_sparsity: list[float], target: float, title: str) -> Path:
    """Bar chart of per-layer sparsity with the target as a line, saved atomically as PNG."""
    plt = pyplot()
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


def sparsify(
    stage: SparsifyStage,
    model: str = "demo",
    calibration_data: str = "c4",
    calibration_samples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    eval_data: str = "wikitext2",
    eval_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    output_dir: str = "runs/sparsify",
    overwrite: bool = False,
    dry_run: bool = False,
    push_to_hub: str | None = None,
) -> dict:
    """Prune the decoder's projection weights to a sparsity, allocated per layer (uniform, OWL or DLP).

    Args:
        stage: the sparsity options (flattened into this command's flags).
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        calibration_data: calibration source (c4, wikitext2, text/jsonl path), validation split.
        calibration_samples: calibration blocks.
        seq_len: tokens per calibration and evaluation block.
        seed: seed for drawing the calibration blocks.
        eval_data: comma-separated perplexity sources (test split).
        eval_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
        output_dir: run directory for model/, decisions.json, metrics.json and the PNG.
        overwrite: replace results already in output_dir.
        dry_run: plan, print the decision and write only decisions.json (no model, no evaluation).
        push_to_hub: upload model/ (with its model card) to this Hub repo (needs HF_TOKEN or `hf auth login`).
    """
    settings = {k: v for k, v in locals().items() if k != "stage"}
    result = run_stage(
        stage,
        settings,
        model=model,
        calibration_data=calibration_data,
        calibration_samples=calibration_samples,
        seed=seed,
        eval_data=eval_data,
        eval_samples=eval_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        output_dir=output_dir,
        overwrite=overwrite,
        dry_run=dry_run,
        push_to_hub=push_to_hub,
    )
    if not dry_run:
        decision = result["decisions"]["decisions"][0]
        _, target, alpha = stage.resolved()
        plot_layer_sparsity(
            Path(output_dir) / PLOT_NAME, decision["layer_sparsity"], target, f"{stage.method} + {stage.allocation} (alpha={alpha})"
        )
    return result
