"""``lightning-prune prune``: remove decoder layers (given, or chosen by a metric), optionally compensate,
save the model, report perplexity before/after. Stage options: :class:`~lightning_prune.stages.PruneStage`."""

from lightning_prune.commands.staged import run_stage
from lightning_prune.stages import PruneStage

__all__ = ["prune"]


def prune(
    stage: PruneStage,
    model: str = "demo",
    calibration_data: str = "wikitext2",
    calibration_samples: int = 64,
    seed: int = 0,
    data: str = "wikitext2",
    seq_len: int = 128,
    num_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    output_dir: str = "runs/prune",
    overwrite: bool = False,
    dry_run: bool = False,
) -> dict:
    """Remove decoder layers (given, or chosen by an importance metric) and save the smaller model.

    Args:
        stage: the pruning options (flattened into this command's flags).
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        calibration_data: wikitext2 / c4 (validation split), a text/jsonl file, or a task (arc_easy, piqa, boolq).
        calibration_samples: calibration blocks of seq_len tokens (or task items), drawn with seed.
        seed: seed of the calibration draw and of the random metric.
        data: comma-separated evaluation sources (wikitext2, c4, text/jsonl paths), test split.
        seq_len: tokens per calibration and evaluation block.
        num_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        dtype: float32, bfloat16 or float16.
        device: e.g. cpu, cuda.
        output_dir: run directory for model/, decisions.json and metrics.json.
        overwrite: replace results already in output_dir.
        dry_run: plan, print the decision and write only decisions.json (no model, no evaluation).
    """
    settings = {k: v for k, v in locals().items() if k != "stage"}
    return run_stage(stage, settings, model=model, calibration_data=calibration_data, calibration_samples=calibration_samples,
                     seed=seed, eval_data=data, eval_samples=num_samples, seq_len=seq_len, batch_size=batch_size,
                     dtype=dtype, device=device, output_dir=output_dir, overwrite=overwrite, dry_run=dry_run)


prune.stage_class = PruneStage
