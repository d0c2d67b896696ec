"""``lightning-prune merge``: CoMe layer merging to a target depth, perplexity before/after."""

from lightning_prune.commands.common import EvaluationData, load_checked_model, run_record, split_names
from lightning_prune.data.text import load_blocks
from lightning_prune.merging.methods import check_merge_request, merge_model
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.loading import load_config
from lightning_prune.results import RunDirectory

__all__ = ["merge"]


def merge(
    model: str = "demo",
    num_layers: int = 7,
    method: str = "come",
    p: float = 1.0,
    rho: float = 0.0,
    remerge: bool = True,
    grid: int = 20,
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
) -> dict:
    """Merge adjacent decoder layers (CoMe, paper 004), removing num_layers layers.

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        num_layers: decoder layers to merge away (one per merge step; 1 .. depth-1).
        method: come (heuristic ratios), come_p (calibration-loss grid) or sum (weight-average baseline).
        p: skew exponent of the retention ratios (> 0; 1 for Llama-like models, inf = dominant layer only).
        rho: minimum retention of the dominant layer, in [0, 1) (0 = off).
        remerge: allow merging an already merged layer again.
        grid: CoMe-P grid size n (n + 1 candidate ratios).
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
    """
    settings = dict(locals())
    run = RunDirectory(output_dir, overwrite)
    run.check()
    target_depth = check_merge_request(load_config(model), method, num_layers, p, rho)
    sources = split_names(data)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len, data=[*sources, calibration_data])
    evaluation = EvaluationData(tokenizer, sources, seq_len=seq_len, num_samples=num_samples)
    calibration = load_blocks(tokenizer, calibration_data, split="validation", seq_len=seq_len, num_samples=calibration_samples, seed=seed)
    settings["data_files"] = evaluation.files
    before = evaluation.evaluate(lm, batch_size=batch_size)
    depth = Anatomy(lm).num_layers
    record = merge_model(lm, list(calibration.split(batch_size)), target_depth, method=method, p=p, rho=rho, remerge=remerge, grid=grid)
    after = evaluation.evaluate(lm, batch_size=batch_size)
    decisions = {"original_layers": depth, "merge": record.to_dict()}
    run.save_model(lm, tokenizer)
    run.write_json("decisions.json", decisions)
    run.write_config(settings)
    metrics = run_record(settings, before=before, after=after)
    run.write_json("metrics.json", metrics)
    return {**metrics, "decisions": decisions}
