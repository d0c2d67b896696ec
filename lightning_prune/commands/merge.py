"""``lightning-prune merge``: CoMe layer merging to a target depth, perplexity before/after.
Stage options: :class:`~lightning_prune.stages.MergeStage`."""

from lightning_prune.commands.staged import run_stage
from lightning_prune.stages import MergeStage

__all__ = ["merge"]


def merge(
    stage: MergeStage,
    model: str = "demo",
    calibration_data: str = "wikitext2",
    calibration_samples: int = 64,
    data: str = "wikitext2",
    seq_len: int = 128,
    num_samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    output_dir: str = "runs/merge",
    overwrite: bool = False,
    dry_run: bool = False,
) -> dict:
    """Merge adjacent decoder layers (CoMe, paper 004), removing num_layers layers.

    Args:
        stage: the merging options (flattened into this command's flags).
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        calibration_data: calibration source (its validation split, blocks drawn with seed).
        calibration_samples: calibration blocks.
        data: comma-separated evaluation sources (test split, first num_samples blocks).
        seq_len: tokens per block (calibration and evaluation).
        num_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        seed: seed of the calibration draw.
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


merge.stage_class = MergeStage
